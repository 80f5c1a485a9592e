"""Property-based tests of the strict parsers: split files, class-count files, YAML configs, command lines.

    pytest -q tests/test_fuzz.py --durations=5     # about 10 s; derandomised, so a failure reproduces

Each parser either returns what its input says, or raises its intended error (a `DataError` subclass
naming the file and line, a `ConfigError` naming the key), never another exception. The bugs this file
found are fixed; the inputs that reached them are pinned by the regression tests at the end.
"""

import functools
import re
import tracemalloc
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from livt import config as c
from livt.config import ConfigError, DataConfig
from livt.data import build_dataset, read_split_file
from livt.data.errors import (
    DataError,
    EmptyClassError,
    LabelRangeError,
    MissingDataError,
    SplitFormatError,
)
from livt.data.splits import SplitFileDataset
from livt.data.stats import counts_from_file, read_class_counts
from livt.losses import LOSSES
from livt.stages import STAGES2

FUZZ = settings(derandomize=True, max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
INT64_MAX = 2**63 - 1
# str.splitlines() also breaks lines at these; editors, `wc -l` and `sed -n Np` do not.
SPLITLINES_ONLY = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def cached_field_docs():
    """Speed only: `_field_docs` re-reads and parses the source of every config dataclass on each call
    (~40 ms) and `update` calls it once per key; it is a pure function of the class."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "_field_docs", functools.lru_cache(maxsize=None)(c._field_docs))
        yield


def write(path, text: str, newline: str = "\n") -> None:
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Split files: `relative/path label` per line

path_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r")
paths = st.text(path_chars, min_size=1, max_size=10).filter(str.strip)
blank = st.text(st.sampled_from(" \t\xa0\u3000\x1f" + SPLITLINES_ONLY), max_size=3)  # no line ends
gap = blank.filter(bool)
word = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=6)
not_a_label = st.one_of(  # a last column that is not a non-negative ASCII integer
    st.sampled_from(["-1", "1.5", "x", "+3", "0x1f", "1e3", "\u0661", "\u00b2", "\u2460", "NaN", "-0"]),
    word.filter(lambda w: not (w.isdigit() and w.isascii())),
    st.integers(INT64_MAX + 1, 10**40).map(str), st.just("9" * 5000))  # past int64
labels = st.integers(0, INT64_MAX)


@st.composite
def split_line(draw):
    """(text of one line, expected (path, label), or None for blank, or 'bad')."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "ok", "blank", "no_label", "bad_label", "extra"]))
    lead, trail = draw(blank), draw(blank)
    if kind == "blank":
        return lead + trail, None
    if kind == "no_label":  # a single column, digits or not
        return lead + draw(word) + trail, "bad"
    path = draw(paths)
    if kind == "bad_label":
        return f"{lead}{path}{draw(gap)}{draw(not_a_label)}{trail}", "bad"
    label = draw(labels)
    text = str(label).zfill(draw(st.integers(0, 4)))  # leading zeros are fine
    if kind == "extra":  # a third column that is not a label makes the line malformed
        return f"{lead}{path}{draw(gap)}{text}{draw(gap)}{draw(not_a_label)}{trail}", "bad"
    return f"{lead}{path}{draw(gap)}{text}{trail}", (path.strip(), label)


@FUZZ
@given(lines=st.lists(split_line(), max_size=8), newline=st.sampled_from(["\n", "\r\n"]),
       final=st.booleans())
def test_split_file_parses_exactly_or_names_the_line(work, lines, newline, final):
    f = work / "split.txt"
    write(f, "\n".join(text for text, _ in lines) + ("\n" if final else ""), newline)
    bad = [n for n, (_, exp) in enumerate(lines, 1) if exp == "bad"]
    good = [exp for _, exp in lines if exp not in (None, "bad")]
    event("malformed line" if bad else "no samples" if not good else "parsed")
    if bad:
        with pytest.raises(SplitFormatError) as e:
            read_split_file(f)
        expected = f"{f}:{bad[0]}: expected '<relative/path> <non-negative integer label>'"
        assert str(e.value).startswith(expected)
    elif not good:
        with pytest.raises(SplitFormatError, match="no samples in split file"):
            read_split_file(f)
    else:
        got_paths, got_labels = read_split_file(f)
        assert got_labels.dtype == np.int64
        assert list(zip(got_paths, got_labels.tolist(), strict=True)) == good


@FUZZ
@given(content=st.one_of(st.binary(max_size=60), st.text(max_size=60),
                         st.text("0123456789 \t\n\r-./a\u00e9\x0c\x85", max_size=60),
                         st.from_regex(r"\A(\S+ \d{15,25}\n){1,3}\Z")))
def test_split_file_arbitrary_bytes_only_split_format_errors(work, content):
    text = content if isinstance(content, str) else content.decode("utf-8", errors="replace")
    f = work / "any.txt"
    f.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    try:
        got_paths, got_labels = read_split_file(f)
    except SplitFormatError as e:
        event("SplitFormatError")
        assert str(e).startswith(f"{f}:")
        m = re.match(re.escape(str(f)) + r":(\d+): ", str(e))
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        assert m is None or 1 <= int(m.group(1)) <= len(lines)
    else:  # any other exception type fails the test
        event("parsed")
        assert len(got_paths) == len(got_labels) > 0 and (got_labels >= 0).all()
        assert all(p and p == p.strip() for p in got_paths)


# ---------------------------------------------------------------------------------------------
# Class-count files: `label count` per line, labels 0..C-1 each once


# Bug: read_class_counts breaks lines at form feeds etc. too (fixed; regression test at the end): plain blanks only.
count_blank = st.text(st.sampled_from(" \t\xa0\u3000\x1f"), max_size=3)


@st.composite
def count_file(draw):
    """(lines, expected outcome): ('ok', counts) | ('line', lineno) | ('missing', labels) | ('empty',)."""
    n = draw(st.integers(0, 6))
    # Bug: counts past int64 crash with OverflowError (fixed; regression test at the end).
    counts = draw(st.lists(st.integers(0, INT64_MAX), min_size=n, max_size=n))
    entries = [(lab, f"{lab} {cnt}") for lab, cnt in enumerate(counts)]
    # Bug: memory grows with the largest label (fixed; regression test at the end): keep the dropped/extra labels small.
    drop = draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=2)) if n else set()
    entries = [e for e in entries if e[0] not in drop]
    entries = draw(st.permutations(entries))
    lines = [(text, None) for _, text in entries]
    for _ in range(draw(st.integers(0, 3))):  # blank and malformed lines at random places
        bad = draw(st.one_of(
            count_blank.map(lambda b: (b, None)),
            st.sampled_from(["-1 3", "0 -2", "1", "1 2 3", "a 1", "1 b", "1.0 2", "x y"])
            .map(lambda t: (t, "bad")),
            st.just("dup")))
        if bad == "dup":
            if not entries:
                continue
            bad = (entries[draw(st.integers(0, len(entries) - 1))][1], "dup")
        lines.insert(draw(st.integers(0, len(lines))), bad)
    # a repeated label is an error at its second occurrence only
    seen, outcome = set(), None
    for lineno, (text, kind) in enumerate(lines, 1):
        if kind == "bad" or (text in seen and kind in (None, "dup") and text.strip()):
            outcome = ("line", lineno)
            break
        if text.strip():
            seen.add(text)
    if outcome is None:
        present = {lab for lab, _ in entries}
        if not present:
            outcome = ("empty",)
        elif set(range(max(present) + 1)) - present:
            outcome = ("missing", sorted(set(range(max(present) + 1)) - present))
        else:
            outcome = ("ok", [counts[lab] for lab in range(max(present) + 1)])
    return [t for t, _ in lines], outcome


@FUZZ
@given(case=count_file(), newline=st.sampled_from(["\n", "\r\n"]))
def test_class_counts_parse_exactly_or_name_the_line(work, case, newline):
    lines, outcome = case
    f = work / "counts.txt"
    write(f, "\n".join(lines) + "\n", newline)
    event(outcome[0])
    if outcome[0] == "ok":
        got = read_class_counts(f)
        assert got.dtype == np.int64 and got.tolist() == outcome[1]
        return
    with pytest.raises(SplitFormatError) as e:
        read_class_counts(f)
    msg = str(e.value)
    if outcome[0] == "line":
        assert msg.startswith(f"{f}:{outcome[1]}: ")
    elif outcome[0] == "missing":
        assert msg.startswith(f"{f}: labels {outcome[1][:10]} missing")
    else:
        assert msg == f"{f}: no class counts in file"


# Bug: '--5', superscript digits, numbers past int64 and non-UTF-8 bytes crash (fixed; see the end): ASCII
# digits, single '-' runs, at most 18 digits in a row.
count_text = st.text(st.sampled_from("0123456789 -\t\nx.\u00e9"), max_size=40).filter(
    lambda t: "--" not in t and not re.search(r"\d{19}", t))


@FUZZ
@given(content=count_text)
def test_class_counts_arbitrary_text_only_split_format_errors(work, content):
    f = work / "anycounts.txt"
    write(f, content)
    try:
        got = read_class_counts(f)
    except SplitFormatError as e:
        assert str(e).startswith(f"{f}:")
    else:
        assert got.dtype == np.int64 and len(got) >= 1 and (got >= 0).all()


# ---------------------------------------------------------------------------------------------
# Labels against data.num_classes, through SplitFileDataset and build_dataset


@pytest.fixture(scope="module")
def image_root(work):
    root = work / "images"  # images are opened only when loaded: an empty root will do
    root.mkdir()
    return root


@st.composite
def labelled(draw):
    """(num_classes, labels): mostly in [0, num_classes), sometimes past it."""
    num_classes = draw(st.integers(1, 8))
    label = st.integers(0, num_classes - 1) | st.integers(num_classes, num_classes + 3)
    inside = st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=12)
    return num_classes, draw(inside | inside | st.lists(label, min_size=1, max_size=12))


@FUZZ
@given(case=labelled(), blanks=st.lists(st.booleans(), min_size=12, max_size=12),
       split=st.sampled_from(["train", "val"]))
def test_labels_outside_num_classes_name_the_line(work, image_root, case, blanks, split):
    num_classes, labels_ = case
    lines, linenos = [], []
    for i, lab in enumerate(labels_):
        if blanks[i]:
            lines.append("   ")
        lines.append(f"x/{i}.png {lab}")
        linenos.append(len(lines))
    f = work / "labels.txt"
    write(f, "\n".join(lines) + "\n")
    bad = [i for i, lab in enumerate(labels_) if lab >= num_classes]
    empty = sorted(set(range(num_classes)) - set(labels_))
    event("label out of range" if bad else "empty class" if empty and split == "train" else "built")
    cfg = DataConfig(dataset="imagenet_lt", root=str(image_root), num_classes=num_classes,
                     split_dir=str(work), train_file=f.name, val_file=f.name)
    if bad:
        i = bad[0]
        expected = (f"{f}:{linenos[i]}: label {labels_[i]} outside [0, {num_classes}) "
                    f"({len(bad)} such line(s); is data.num_classes={num_classes} right?)")
        with pytest.raises(LabelRangeError) as e:
            SplitFileDataset(image_root, f, num_classes)
        assert str(e.value) == expected
        with pytest.raises(LabelRangeError) as e:
            build_dataset(cfg, split)
        assert str(e.value) == expected
        return
    ds = SplitFileDataset(image_root, f, num_classes)
    assert ds.targets.tolist() == labels_
    assert [ds.origin(i) for i in range(len(ds))] == [f"{f}:{n}" for n in linenos]
    if split == "train" and empty:  # every training class needs an image; val/test need not
        with pytest.raises(EmptyClassError) as e:
            build_dataset(cfg, split)
        names = ", ".join(f"{k} ({ds.class_names[k]})" for k in empty[:10])
        assert str(e.value).startswith(f"{f}: class {names}")
    else:
        assert build_dataset(cfg, split).targets.tolist() == labels_


# ---------------------------------------------------------------------------------------------
# Configs: YAML documents and command lines


def declared(stage: str) -> dict[str, typing.Any]:
    return {k: tp for k, (tp, _) in c.flat_fields(c.STAGES[stage]).items()}


def get(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def item_types(tp, n: int) -> tuple:
    """The item types of a tuple type for n items: tuple[int, ...] is variadic."""
    args = typing.get_args(tp)
    return (args[0],) * n if len(args) == 2 and args[1] is Ellipsis else args


def has_type(value, tp) -> bool:
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        args = item_types(tp, len(value)) if isinstance(value, tuple) else ()
        return isinstance(value, tuple) and len(value) == len(args) and all(map(has_type, value, args))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return type(value) is tp


# Bug: FinetuneConfig's default optim.warmup_epochs is the int 10, not a float (fixed; regression test at the end).
UNTYPED_DEFAULTS = {("finetune", "optim.warmup_epochs"): 10}


def assert_declared_types(cfg, stage: str) -> None:
    for key, tp in declared(stage).items():
        value = get(cfg, key)
        if type(value) is int and value == UNTYPED_DEFAULTS.get((stage, key)):  # the untouched default
            continue
        assert has_type(value, tp), (key, value, tp)


ALL_KEYS = sorted({k for stage in c.STAGES for k in declared(stage)})
SECTIONS = sorted({k.split(".")[0] for k in ALL_KEYS if "." in k})
LEAVES = sorted({k.split(".")[-1] for k in ALL_KEYS})
key_text = st.one_of(st.sampled_from(SECTIONS + LEAVES + ALL_KEYS), st.text(max_size=8),
                     st.integers(-3, 3), st.booleans(), st.none())
# Bug: an integer past the float range crashes a float key with OverflowError (fixed; regression test at the end).
scalars = st.one_of(st.integers(-(2**1000), 2**1000), st.floats(), st.booleans(), st.none(),
                    st.text(max_size=8), st.sampled_from(["1,2,3", "0.5,0.5", "true", "1e-3", "3", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(key_text, inner, max_size=3)),
                      max_leaves=8)


def render(value, tp) -> str:
    """A typed value as a command-line string."""
    if typing.get_origin(tp) is tuple:
        return ",".join(render(v, t) for v, t in zip(value, item_types(tp, len(value)), strict=True))
    if tp is bool:
        return value if isinstance(value, str) else str(value).lower()
    return repr(value) if tp is float else str(value)


def typed_value(tp):
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(typed_value(args[0]), min_size=1, max_size=3).map(tuple)
        return st.tuples(*(typed_value(t) for t in args))
    return {int: st.integers(-(10**30), 10**30), float: st.floats(allow_nan=False),
            bool: st.one_of(st.booleans(), st.sampled_from(["yes", "no", "1", "0", "TRUE", "False"])),
            str: st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                         max_size=8).filter(lambda s: not s.startswith("-"))}[tp]


def expected_value(value, tp):
    if typing.get_origin(tp) is tuple:
        return tuple(expected_value(v, t) for v, t in zip(value, item_types(tp, len(value)), strict=True))
    if tp is bool and isinstance(value, str):
        return value.lower() in ("yes", "1", "true")
    return float(value) if tp is float else value


@st.composite
def yaml_document(draw, stage):
    """Any YAML value at the top, usually a mapping mixing valid keys (well- or wrong-typed) with junk."""
    kind = draw(st.sampled_from(["mapping", "mapping", "mapping", "flat", "other"]))
    if kind == "other":
        return draw(values)
    doc: dict = {}
    fields = declared(stage)
    for key in draw(st.lists(st.sampled_from(ALL_KEYS), max_size=4)):
        if key in fields and draw(st.booleans()):  # a value of the declared type (tuples as lists)
            value = draw(typed_value(fields[key]))
            value = list(value) if isinstance(value, tuple) else value
        else:
            value = draw(scalars | st.lists(scalars, max_size=3))
        if kind == "flat":
            doc[key] = value  # dotted keys at the top level are accepted too
        else:
            *parents, leaf = key.split(".")
            node = doc
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
            node[leaf] = value
    if draw(st.integers(0, 2)) == 0:  # junk keys
        doc.update(draw(st.dictionaries(key_text, values, max_size=2)))
    return doc


@FUZZ
@given(data=st.data(), stage=st.sampled_from(list(c.STAGES)))
def test_yaml_config_typed_or_config_error_naming_the_key(work, data, stage):
    doc = data.draw(yaml_document(stage))
    f = work / "config.yaml"
    f.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        flat = c.load_yaml(f)
    except ConfigError as e:
        event("not a mapping")
        assert str(e) == f"{f}: expected a mapping of keys, got {type(doc).__name__}"
        return
    fields = declared(stage)
    try:
        cfg = c.update(c.STAGES[stage](), flat, str(f))
    except ConfigError as e:
        msg = str(e)
        event("ConfigError")
        assert msg.startswith(f"{f}: ")
        named = [k for k in flat if f"key '{k}'" in msg]
        assert named, msg
        # the first offending key in file order: every key before it applied cleanly
        first = list(flat).index(named[0])
        c.update(c.STAGES[stage](), dict(list(flat.items())[:first]), str(f))
        return
    event("config")
    assert_declared_types(cfg, stage)
    for key, value in flat.items():
        assert key in fields
        if isinstance(value, str) and fields[key] is str:
            assert get(cfg, key) == value
        if isinstance(value, int) and not isinstance(value, bool) and fields[key] in (int, float):
            assert get(cfg, key) == fields[key](value)


@FUZZ
@given(content=st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_yaml_arbitrary_text_only_config_errors(work, content):
    f = work / "any.yaml"
    f.write_bytes(content.encode("utf-8"))
    try:
        cfg = c.parse_args("pretrain", ["--config", str(f)])
    except ConfigError as e:
        assert str(f) in str(e)
    else:
        assert_declared_types(cfg, "pretrain")


# keys that name a registered function take one of its names (any other string is refused at parse time)
NAMES = {"loss.name": st.sampled_from(list(LOSSES)), "stage2": st.sampled_from(["", *STAGES2])}


@st.composite
def valid_override(draw, stage):
    # `method` is set through the --method layer (a recipe name), not as a plain key
    key = draw(st.sampled_from(sorted(k for k in declared(stage) if k not in c.LAYER_FLAGS)))
    tp = declared(stage)[key]
    value = draw(NAMES[key]) if key in NAMES else draw(typed_value(tp))
    flag = "--" + (key.replace("_", "-") if draw(st.booleans()) else key)
    text = render(value, tp)
    tokens = [f"{flag}={text}"] if draw(st.booleans()) else [flag, text]
    if tp is bool and value is True and draw(st.booleans()):
        tokens = [flag]  # a boolean key alone means true
    return key, expected_value(value, tp), tokens


@FUZZ
@given(data=st.data(), stage=st.sampled_from(list(c.STAGES)),
       preset=st.sampled_from([None, "tiny", "demo", "places_lt"]))
def test_well_formed_command_lines_round_trip(data, stage, preset):
    overrides = data.draw(st.lists(valid_override(stage), max_size=6))
    argv = (["--data", preset] if preset else []) + [t for _, _, toks in overrides for t in toks]
    cfg = c.parse_args(stage, argv)
    assert_declared_types(cfg, stage)
    for key, value in dict((k, v) for k, v, _ in overrides).items():  # the last one wins
        assert get(cfg, key) == value, (key, argv)


@st.composite
def junk_args(draw, stage):
    kind = draw(st.sampled_from(["valid", "valid", "bad_value", "unknown", "stray", "preset", "config"]))
    if kind == "valid":
        return draw(valid_override(stage))[2]
    if kind == "bad_value":
        return [f"--{draw(st.sampled_from(sorted(declared(stage))))}", draw(st.text(max_size=6))]
    if kind == "unknown":
        return [f"--{draw(st.text(max_size=8))}", draw(st.text(max_size=4))]
    if kind == "stray":
        return [draw(st.text(max_size=6).filter(lambda t: not t.startswith("--")))]
    if kind == "preset":
        return ["--data", draw(st.sampled_from(c.presets(stage)) | st.text(max_size=6))]
    return ["--config", "/nonexistent/" + draw(st.text(st.characters(codec="ascii"), max_size=6)) + ".yaml"]


@FUZZ
@given(data=st.data(), stage=st.sampled_from(list(c.STAGES)))
def test_command_line_typed_or_config_error_naming_the_token(data, stage):
    argv = [t for group in data.draw(st.lists(junk_args(stage), max_size=6)) for t in group]
    assume(not {"-h", "--help"} & set(argv))
    try:
        cfg = c.parse_args(stage, argv)
    except ConfigError as e:
        msg = str(e)
        event("ConfigError")
        keys = [t[2:].partition("=")[0].replace("-", "_") for t in argv if t.startswith("--")]
        named = [k for k in keys if f"'{k}'" in msg or f"--{k}" in msg]
        others = [t for t in argv if f"'{t}'" in msg or (t.startswith("/nonexistent/") and t in msg)]
        assert named or others, (argv, msg)
    else:
        event("config")
        assert_declared_types(cfg, stage)


# ---------------------------------------------------------------------------------------------
# Bugs found by the properties above, pinned until fixed (strict: an XPASS fails the suite)


@pytest.mark.parametrize("sep", ["\x0c", "\x85", "\u2028"], ids=["form_feed", "NEL", "LS"])
def test_count_file_line_numbers_count_newlines_only(work, sep):
    f = work / "ff.txt"
    write(f, f"0 1{sep}\n1 x\n")
    with pytest.raises(SplitFormatError) as e:
        read_class_counts(f)
    assert str(e.value).startswith(f"{f}:2: ")


@pytest.mark.parametrize("content", [b"0 5\n1 \xff\n", b"0 5\n1 --5\n", "0 5\n1 \u00b2\n".encode(),
                                     f"0 5\n1 {2**63}\n".encode()],
                         ids=["not_utf8", "double_minus", "superscript", "2**63"])
def test_class_count_file_crashes(work, content):
    f = work / "crash.txt"
    f.write_bytes(content)
    with pytest.raises(SplitFormatError, match=re.escape(str(f))):
        read_class_counts(f)


def test_class_count_file_memory_does_not_grow_with_the_label(work):
    f = work / "big_label.txt"
    write(f, "0 5\n200000 3\n")
    tracemalloc.start()
    try:
        with pytest.raises(SplitFormatError, match="missing"):
            read_class_counts(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.0f} MiB for a two-line file"


def test_stats_of_a_blank_file(work):
    f = work / "blank.txt"
    write(f, "\n  \n")
    with pytest.raises(DataError, match=re.escape(str(f))):
        counts_from_file(f)


@pytest.mark.parametrize("content", [f"optim: {{blr: {10**400}}}\n".encode(), b"run_name: 2024-02-30\n",
                                     f"seed: {'1' * 5000}\n".encode(), b"overwrite: !!bool maybe\n",
                                     b"seed: \xff\n", b"[" * 5000],
                         ids=["float_overflow", "bad_date", "5000_digits", "bool_tag", "not_utf8", "deep"])
def test_yaml_crashes(work, content):
    f = work / "crash.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(f))):
        c.parse_args("pretrain", ["--config", str(f)])


@pytest.mark.parametrize("content", ["0\n", "false\n", "[]\n", "''\n"])
def test_falsy_yaml_top_level_is_not_a_mapping(work, content):
    f = work / "falsy.yaml"
    write(f, content)
    try:
        flat = c.load_yaml(f)
    except ConfigError as e:
        assert "expected a mapping of keys" in str(e)
    else:
        raise AssertionError(f"{content!r} accepted as the config {flat!r}")


@pytest.mark.parametrize("stage", ["finetune", "stage2", "evaluate"])
def test_defaults_have_the_declared_types(stage):
    cfg = c.from_dict(stage, {})
    again = c.from_dict(stage, yaml.safe_load(yaml.safe_dump(c.to_dict(cfg))))
    assert again == cfg
    assert c.config_hash(again) == c.config_hash(cfg)
    for key, tp in declared(stage).items():
        assert has_type(get(cfg, key), tp), (key, get(cfg, key), tp)


def test_pretrain_defaults_have_the_declared_types():
    assert_declared_types(c.from_dict("pretrain", {}), "pretrain")


def test_missing_count_file_and_split_file(work):
    for fn in (read_class_counts, read_split_file):
        with pytest.raises(MissingDataError, match=re.escape(str(work / "nope.txt"))):
            fn(work / "nope.txt")
