"""Protocol files: validation of every key, generic parameter mapping, canonical hash, lookup order."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleihc import protocol as protocol_mod
from cleihc import stains
from cleihc.errors import CleihcError, ProtocolError
from cleihc.protocol import Protocol, build_params, find_protocol, list_protocols, load_protocol

BUILTINS = ("cd3", "cd4", "cd8", "cxcl10", "gag-alcian", "gag-colloidal-iron")
REPO_PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"


def builtin_text(name: str) -> str:
    return (REPO_PROTOCOLS / f"{name}.toml").read_text(encoding="utf-8")


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ built-ins
# Raised whenever a built-in protocol's values change (its results change with them).
BUILTIN_VERSIONS = {
    "cd3": "1.1.1",
    "cd4": "1.1.1",
    "cd8": "1.1.1",
    "cxcl10": "1.0.1",
    "gag-alcian": "1.0.0",
    "gag-colloidal-iron": "1.0.0",
}


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_loads(name):
    p = load_protocol(name)
    assert p.name == name and p.version == BUILTIN_VERSIONS[name] and p.schema == 1
    assert p.description
    assert p.target in p.stains.matrix.stain_names and p.counterstain in p.stains.matrix.stain_names
    assert p.thresholds.positive_od == p.thresholds.bins_od[0] == 0.2
    assert p.analysis.mpp_um == 0.5
    assert p.regions.report[0] == "tissue"
    assert Path(p.source).name == f"{name}.toml"
    # every table maps onto the owners' dataclasses
    from cleihc.cells import CellParams
    from cleihc.regions import CompartmentParams
    from cleihc.tissue import TissueParams

    assert isinstance(p.tissue, TissueParams)
    assert isinstance(p.cells, CellParams)
    assert isinstance(p.compartments, CompartmentParams)


def test_builtin_values():
    cd3 = load_protocol("cd3")
    assert cd3.measure == ("cells",) and cd3.target == "dab" and cd3.counterstain == "hematoxylin"
    assert cd3.stains.preset == "hdab" and cd3.stains.matrix == stains.preset("hdab")
    assert cd3.cells.compartment == "membrane"
    assert cd3.metrics.h_score is True
    cx = load_protocol("cxcl10")
    assert cx.measure == ("area", "cells") and cx.cells.compartment == "cell"
    gag = load_protocol("gag-alcian")
    assert (gag.target, gag.counterstain) == ("alcian_blue", "nuclear_fast_red")
    assert gag.metrics.positive_pixel_count is True and gag.metrics.h_score is False
    ci = load_protocol("gag-colloidal-iron")
    assert ci.stains.matrix.names[:2] == ("colloidal_iron", "nuclear_fast_red")
    assert ci.measure == ("area",)


def test_builtin_files_have_explanatory_header():
    for name in BUILTINS:
        text = builtin_text(name)
        for section in (
            "[protocol]",
            "[stains]",
            "[background]",
            "[analysis]",
            "[thresholds]",
            "[tissue]",
            "[cells]",
        ):
            assert f"# {section}" in text, (name, section)


# ------------------------------------------------------------------------------------------------ hashing
def test_sha256_stable_under_reformatting(tmp_path):
    original = load_protocol("cd3")
    data = tomllib.loads(builtin_text("cd3"))
    # Reformat: tables reordered, inline tables, extra comments and spaces, ints for floats, keys reordered,
    # the preset expanded to its own vectors, and defaults written out.
    reformatted = """
# a different layout of the same protocol
[metrics]
positive_pixel_count=false
h_score=true
[regions]
report = [ "tissue","epidermis", "dermis",
  "papillary_dermis", "superficial_dermis", "deep_dermis" ]   # same list
[thresholds]
positive_od = 0.2
bins_od = [0.2, 0.4, 0.6]
[analysis]
halo_um = 25
tile_size_px = 2048
mpp_um = 0.5
raster_mpp_um = 2
[background]
rgb = [255, 255, 255.0]
mode = "estimate"
[compartments]
superficial_um = 500
papillary_um = 150
[cells]
smoothing_sigma_um = 0.50
measure = "mean"
compartment = "membrane"
[stains]
drift_action = "warn"
drift_tolerance_deg = 10
estimate = "fixed"
preset = "hdab"
vectors.hematoxylin = [0.650, 0.704, 0.286]
vectors.dab = [0.268, 0.570, 0.776]
[protocol]
counterstain = "hematoxylin"
target = "dab"
measure = ["cells"]
description = "DESCRIPTION"
schema = 1
version = "1.1.1"
name = "cd3"
""".replace("DESCRIPTION", data["protocol"]["description"])
    p = load_protocol(write(tmp_path, reformatted))
    assert p == original
    assert p.sha256 == original.sha256
    # any content change changes the hash
    changed = reformatted.replace("halo_um = 25", "halo_um = 26")
    assert load_protocol(write(tmp_path, changed, "q.toml")).sha256 != original.sha256


def test_to_toml_and_to_dict_round_trip(tmp_path):
    for name in BUILTINS:
        p = load_protocol(name)
        text = p.to_toml()
        assert p.sha256 in text
        again = load_protocol(write(tmp_path, text, f"{name}.toml"))
        assert again == p and again.sha256 == p.sha256
        assert Protocol.from_dict(p.to_dict()).sha256 == p.sha256
        # JSON-serialisable provenance
        import json

        assert json.loads(json.dumps(p.to_dict())) == p.to_dict()


def test_resolved_fixes_vectors_and_background(tmp_path):
    p = load_protocol("cd8")
    est = stains.StainMatrix(("hematoxylin", "dab"), [[0.6, 0.72, 0.3], [0.3, 0.55, 0.78]], (241, 239, 247))
    r = p.resolved(stains=est)
    assert r.stains.estimate == "fixed" and r.stains.preset == ""
    assert r.background.mode == "fixed" and r.background.rgb == (241.0, 239.0, 247.0)
    assert r.stains.matrix == est
    assert r.sha256 != p.sha256
    again = load_protocol(write(tmp_path, r.to_toml()))
    assert again.sha256 == r.sha256
    np.testing.assert_allclose(again.stains.matrix.od_vectors, est.od_vectors, atol=1e-15)
    assert again.stains.matrix.background_rgb == (241.0, 239.0, 247.0)
    # background only
    r2 = p.resolved(background=np.array([250.0, 250.0, 251.0]))
    assert r2.background == protocol_mod.BackgroundParams("fixed", (250.0, 250.0, 251.0))
    assert r2.stains.matrix.background_rgb == (250.0, 250.0, 251.0)
    with pytest.raises(ProtocolError, match="target"):
        p.resolved(stains=stains.preset("he"))


# ------------------------------------------------------------------------------------------------ validation
def mutate(name: str, table: str, key: str, value) -> str:
    """The built-in protocol text with one key replaced (value given as TOML text), or deleted (value None)."""
    lines = builtin_text(name).splitlines()
    out, in_table, done = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if in_table and not done and value is not None:
                out.append(f"{key} = {value}")
                done = True
            in_table = stripped == f"[{table}]"
        elif in_table and stripped.split("=")[0].strip() == key:
            if value is not None:
                out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if in_table and not done and value is not None:
        out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    [
        ("protocol", "schema", "2", "schema"),
        ("protocol", "version", '"1.0"', "semantic"),
        ("protocol", "name", '"cd 3"', "name"),
        ("protocol", "measure", '["area", "volume"]', "measure"),
        ("protocol", "measure", "[]", "measure"),
        ("protocol", "target", '"eosin"', "target"),
        ("protocol", "counterstain", '"dab"', "different"),
        ("protocol", "target", None, "target is missing"),
        ("protocol", "colour", '"x"', "unknown key \\[protocol\\] colour"),
        ("stains", "preset", '"hdabx"', "hdab"),
        ("stains", "estimate", '"auto"', "macenko"),
        ("stains", "drift_action", '"ignore"', "warn"),
        ("stains", "drift_tolerance_deg", "0", "degrees"),
        ("stains", "vectors", "{ hematoxylin = [0.65, 0.7, 0.29], dab = [0.65, 0.7, 0.29] }", "parallel"),
        ("stains", "vectors", "{ hematoxylin = [0.65, 0.7], dab = [0.27, 0.57, 0.78] }", "three numbers"),
        (
            "stains",
            "vectors",
            '{ hematoxylin = [0.65, 0.7, "x"], dab = [0.27, 0.57, 0.78] }',
            "three numbers",
        ),
        ("stains", "vectors", "{ hematoxylin = [0.65, 0.7, 0.29], eosin = [0.07, 0.99, 0.11] }", "preset"),
        ("stains", "vectors", "{ hematoxylin = [0.65, -0.7, 0.29], dab = [0.27, 0.57, 0.78] }", "negative"),
        ("background", "mode", '"auto"', "estimate"),
        ("background", "rgb", "[0, 255, 255]", "1..255"),
        ("background", "rgb", "[255, 255]", "3 values"),
        ("analysis", "mpp_um", "0", "mpp_um"),
        ("analysis", "mpp_um", '"0.5"', "number"),
        ("analysis", "tile_size_px", "1024.5", "whole number"),
        ("analysis", "tile_size_px", "true", "whole number"),
        ("analysis", "halo_um", "nan", "finite"),
        ("analysis", "halo_um", "inf", "finite"),
        ("thresholds", "bins_od", "[0.4, 0.2, 0.6]", "increasing"),
        ("thresholds", "positive_od", "0.3", "bins_od"),
        ("cells", "compartment", '"cytoplasm"', "membrane"),
        ("cells", "split", '"yes"', "true or false"),
        ("cells", "nucleus_threshold_od", "-1", "nucleus_threshold_od"),
        ("cells", "nucleus_threshould_od", "0.1", "unknown key \\[cells\\] nucleus_threshould_od"),
        ("tissue", "method", '"magic"', "otsu"),
        ("compartments", "superficial_um", "100", "superficial_um"),
        ("regions", "report", '["tissue", "tissue"]', "unique"),
        ("metrics", "h_score", "1", "true or false"),
    ],
)
def test_bad_values_name_file_key_and_allowed(tmp_path, table, key, value, expected):
    path = write(tmp_path, mutate("cd3", table, key, value), "bad.toml")
    with pytest.raises(ProtocolError, match=expected) as exc:
        load_protocol(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))


def test_structural_errors(tmp_path):
    cases = {
        "unknown table": builtin_text("cd3") + "\n[extras]\na = 1\n",
        "missing": "[stains]\npreset = 'hdab'\n",
        "not valid TOML": builtin_text("cd3").replace("[cells]", "[cells"),
        "must be a table": "tissue = 3\n" + builtin_text("cd3").replace("[tissue]\n", ""),
    }
    for expected, text in cases.items():
        with pytest.raises(ProtocolError, match=expected):
            load_protocol(write(tmp_path, text, "x.toml"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[protocol]")
    with pytest.raises(ProtocolError, match="UTF-8"):
        load_protocol(tmp_path / "bin.toml")
    with pytest.raises(ProtocolError, match="not found"):
        load_protocol(tmp_path / "absent.toml")
    with pytest.raises(ProtocolError, match="folder"):
        load_protocol(Path(str(tmp_path)) / ".." / tmp_path.name / "")  # a directory given with a separator


def test_defaults_fill_missing_keys(tmp_path):
    minimal = """
[protocol]
name = "mini"
version = "0.1.0"
schema = 1
measure = ["area"]
target = "dab"
counterstain = "hematoxylin"
[stains]
vectors = { hematoxylin = [0.65, 0.70, 0.29], dab = [0.27, 0.57, 0.78] }
"""
    p = load_protocol(write(tmp_path, minimal))
    from cleihc.cells import CellParams
    from cleihc.tissue import TissueParams

    assert p.cells == CellParams() and p.tissue == TissueParams()
    assert p.analysis == protocol_mod.AnalysisParams()
    assert p.thresholds.bins_od == (0.2, 0.4, 0.6) and p.thresholds.positive_od == 0.2
    assert p.stains.estimate == "fixed" and p.stains.preset == ""
    assert p.description == ""


# ------------------------------------------------------------------------------------------------ generic mapper
@dataclass(frozen=True)
class Example:
    count: int = 3
    ratio: float = 0.5
    flag: bool = False
    label: str = "x"
    mode: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (1.0, 2.0)
    names: tuple[str, ...] = ()
    maybe: float | None = None

    def __post_init__(self):
        if self.count > 10:
            raise ValueError(f"count = {self.count}: must be at most 10")


def test_build_params_generic():
    e = build_params(
        Example,
        {
            "count": 4,
            "ratio": 1,
            "flag": True,
            "mode": "b",
            "pair": [3, 4.5],
            "names": ["p", "q"],
            "maybe": 2,
        },
        section="example",
    )
    assert e == Example(4, 1.0, True, "x", "b", (3.0, 4.5), ("p", "q"), 2.0)
    assert isinstance(e.ratio, float) and isinstance(e.pair[0], float)
    assert build_params(Example, {}, section="example") == Example()
    bad = [
        ({"count": 1.5}, "whole number"),
        ({"count": True}, "whole number"),
        ({"ratio": "1"}, "number"),
        ({"flag": 1}, "true or false"),
        ({"label": 3}, "text"),
        ({"mode": "c"}, "one of 'a', 'b'"),
        ({"pair": [1.0]}, "2 values"),
        ({"pair": 1.0}, "list"),
        ({"names": ["a", 1]}, "text"),
        ({"count": 11}, "at most 10"),
        ({"other": 1}, "unknown key \\[example\\] other; allowed keys: count, ratio"),
        ({"ratio": 10**400}, "finite"),
    ]
    for table, expected in bad:
        with pytest.raises(ProtocolError, match=expected) as exc:
            build_params(Example, table, section="example", path="f.toml")
        assert str(exc.value).startswith("f.toml: ")
    with pytest.raises(ProtocolError, match="must be a table"):
        build_params(Example, [1, 2], section="example")


# ------------------------------------------------------------------------------------------------ fuzzing
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
BASE = tomllib.loads(builtin_text("cxcl10"))
TABLE_KEYS = [(t, k) for t, tbl in BASE.items() for k in (tbl or {"x": 0})] + [("cells", "compartment")]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(TABLE_KEYS), value=toml_values, delete=st.booleans())
def test_fuzz_values_only_raise_protocol_error(target, value, delete):
    data = copy.deepcopy(BASE)
    table, key = target
    if delete:
        data[table].pop(key, None)
    else:
        data[table][key] = value
    try:
        p = Protocol.from_dict(data)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(p, Protocol)
        assert len(p.sha256) == 64


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=len(builtin_text("cd3"))),
    junk=st.text(max_size=20),
    whole=st.text(max_size=200),
)
def test_fuzz_text_only_raises_protocol_error(tmp_path_factory, cut, junk, whole):
    folder = tmp_path_factory.mktemp("fuzz")
    text = builtin_text("cd3")
    for i, candidate in enumerate((text[:cut] + junk + text[cut:], text[:cut], whole)):
        path = folder / f"f{i}.toml"
        path.write_text(candidate, encoding="utf-8", errors="surrogatepass")
        try:
            load_protocol(path)
        except ProtocolError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


# ------------------------------------------------------------------------------------------------ lookup
def test_lookup_order(tmp_path, monkeypatch):
    env_a, env_b, cwd = tmp_path / "a", tmp_path / "b", tmp_path / "work"
    for d in (env_a, env_b, cwd / "protocols"):
        d.mkdir(parents=True)
    text = builtin_text("cd3")
    (env_b / "cd3.toml").write_text(text.replace('version = "1.1.1"', 'version = "9.0.0"'), encoding="utf-8")
    (cwd / "protocols" / "cd3.toml").write_text(text.replace('version = "1.1.1"', 'version = "8.0.0"'))
    (cwd / "protocols" / "cd4.toml").write_text(
        builtin_text("cd4").replace('version = "1.1.1"', 'version = "7.0.0"'), encoding="utf-8"
    )
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CLEIHC_PROTOCOL_PATH", f"{env_a}{protocol_mod.os.pathsep}{env_b}")
    assert find_protocol("cd3") == env_b / "cd3.toml"  # env path first (a is empty, then b)
    assert load_protocol("cd3").version == "9.0.0"
    assert find_protocol("cd4") == Path("protocols").absolute() / "cd4.toml"  # then ./protocols
    assert load_protocol("cd4").version == "7.0.0"
    builtin = find_protocol("cd8")  # then the built-ins
    assert builtin.name == "cd8.toml" and builtin.parent.name == "protocols"
    assert load_protocol("cd8").version == "1.1.1"
    # an existing file path wins over names
    assert find_protocol(env_b / "cd3.toml") == env_b / "cd3.toml"
    infos = {i.name: i for i in list_protocols()}
    assert (
        infos["cd3"].version == "9.0.0"
        and infos["cd4"].version == "7.0.0"
        and infos["cd8"].version == "1.1.1"
    )
    assert set(BUILTINS) <= set(infos)
    monkeypatch.delenv("CLEIHC_PROTOCOL_PATH")
    assert load_protocol("cd3").version == "8.0.0"


def test_lookup_errors_list_available(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProtocolError, match=r"no protocol named 'cd99'; available: .*cd3") as exc:
        find_protocol("cd99")
    assert "\n" not in str(exc.value)
    with pytest.raises(ProtocolError, match="not found"):
        find_protocol("some/where/cd3.toml")
    with pytest.raises(ProtocolError, match="not a protocol name"):
        find_protocol("cd3;rm")
    # invalid files are skipped by list_protocols with a warning
    (tmp_path / "protocols").mkdir()
    (tmp_path / "protocols" / "broken.toml").write_text("[protocol\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        names = [i.name for i in list_protocols()]
    assert "broken" not in names and "cd3" in names
    assert "broken.toml" in caplog.text


def test_protocol_error_is_cleihc_error():
    assert issubclass(ProtocolError, CleihcError) and issubclass(ProtocolError, ValueError)
    assert dataclasses.is_dataclass(Protocol)


# ------------------------------------------------------------------------------------------------ tester's findings
def test_mpp_above_raster_names_mpp_um(tmp_path):
    # mpp_um = 20 (µm/px written for 0.5) in an area protocol: the error is about mpp_um, the key the user wrote,
    # and says what raster_mpp_um must be (it was "[analysis] raster_mpp_um = 2.0: ...", a key not in the file).
    path = write(tmp_path, mutate("gag-alcian", "analysis", "mpp_um", "20"), "gag-alcian.toml")
    with pytest.raises(ProtocolError) as exc:
        load_protocol(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: [analysis] mpp_um = 20.0: must be at most raster_mpp_um = 2.0")
    assert "raster_mpp_um must be at least mpp_um" in msg and "\n" not in msg


@pytest.mark.parametrize(("mpp", "raster"), [("2", None), ("20", "40"), ("1.01", None)])
def test_cells_protocol_refuses_resolution_too_coarse_for_nuclei(tmp_path, mpp, raster):
    text = mutate("cd3", "analysis", "mpp_um", mpp)
    if raster:
        text = text.replace("[analysis]\n", f"[analysis]\nraster_mpp_um = {raster}\n")
    path = write(tmp_path, text, "cd3.toml")
    with pytest.raises(ProtocolError) as exc:
        load_protocol(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: [analysis] mpp_um = {mpp}")
    assert f"at most {protocol_mod.CELLS_MAX_MPP_UM}" in msg and "cells" in msg and "\n" not in msg


def test_cells_resolution_bound_is_inclusive_and_area_protocols_are_free(tmp_path):
    assert (
        load_protocol(write(tmp_path, mutate("cd3", "analysis", "mpp_um", "1.0"), "cd3.toml")).analysis.mpp_um
        == 1
    )
    area = mutate("gag-alcian", "analysis", "mpp_um", "2.0")
    assert load_protocol(write(tmp_path, area, "gag-alcian.toml")).analysis.mpp_um == 2.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("superficial_um", "100", "superficial_um = 100.0: must be greater than papillary_um = 150.0"),
        ("papillary_um", "0", "papillary_um = 0.0: must be a depth greater than 0"),
        ("min_contrast", "0.5", "min_contrast = 0.5: must be a ratio between 1 and 100"),
        ("mpp_um", "0.05", "mpp_um = 0.05: must be between 0.1 and 50"),
    ],
)
def test_compartments_errors_follow_the_protocol_format(tmp_path, key, value, expected):
    path = write(tmp_path, mutate("cd3", "compartments", key, value), "cd3.toml")
    with pytest.raises(ProtocolError) as exc:
        load_protocol(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: [compartments] {expected}") and "\n" not in msg


def test_owner_tables_are_not_named_twice(tmp_path):
    path = write(tmp_path, mutate("cd3", "cells", "smoothing_sigma_um", "50"), "cd3.toml")
    with pytest.raises(ProtocolError, match=r": \[cells\] smoothing_sigma_um = 50.0: must be"):
        load_protocol(path)


def test_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "cd3.toml"
    path.write_bytes(b"\xef\xbb\xbf" + builtin_text("cd3").encode("utf-8"))  # as Windows Notepad saves it
    assert load_protocol(path).sha256 == load_protocol("cd3").sha256


@pytest.mark.parametrize("vector", ["[1e308, 1e308, 1e308]", "[166, 180, 73]", "[0.65, 0.7, 100.5]"])
def test_vector_components_are_bounded(tmp_path, vector):
    text = mutate("cd3", "stains", "preset", None).replace(
        "[stains]\n", f"[stains]\nvectors = {{ hematoxylin = {vector}, dab = [0.27, 0.57, 0.78] }}\n"
    )
    path = write(tmp_path, text, "cd3.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was a numpy overflow RuntimeWarning, then a false "parallel" error
        with pytest.raises(ProtocolError) as exc:
            load_protocol(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: [stains] vectors.hematoxylin = ") and "from 0 to 100" in msg
    # only the direction counts: a vector written in hundredths is still accepted
    scaled = text.replace(vector, "[65, 70, 29]")
    assert load_protocol(write(tmp_path, scaled, "cd3.toml")).stains.vectors[0][0] == "hematoxylin"


def test_list_by_lookup_name_with_origin_and_shadowing(tmp_path, monkeypatch, caplog):
    local = tmp_path / "protocols"
    local.mkdir()
    text = builtin_text("cd3")
    (local / "my-cd3.toml").write_text(
        text.replace('version = "1.1.1"', 'version = "1.2.0"'), encoding="utf-8"
    )
    (local / "cd4.toml").write_text(builtin_text("cd4").replace('"1.1.1"', '"7.0.0"'), encoding="utf-8")
    (local / "cd8.toml").write_text("[protocol\n", encoding="utf-8")  # broken: hides the built-in cd8
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLEIHC_PROTOCOL_PATH", raising=False)
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        infos = {i.name: i for i in list_protocols()}
    my = infos["my-cd3"]  # listed by the name that selects it, not as a second "cd3"
    assert my.protocol_name == "cd3" and my.version == "1.2.0" and my.origin == "./protocols"
    assert infos["cd3"].version == "1.1.1" and infos["cd3"].origin == "built-in"  # the built-in stays listed
    assert infos["cd3"].protocol_name == "" and infos["cd3"].shadows == ()
    assert infos["cd4"].version == "7.0.0"
    assert [(p.name, origin) for p, origin in infos["cd4"].shadows] == [("cd4.toml", "built-in")]
    assert "cd8" not in infos and "cd8.toml" in caplog.text and "hides" in caplog.text  # not the built-in cd8
    # loading a file whose stem differs from its [protocol] name warns once, naming both
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        assert load_protocol("my-cd3").name == "cd3"
    assert len(caplog.records) == 1
    assert "'my-cd3'" in caplog.text and "[protocol] name = 'cd3'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        load_protocol("cd4")
    assert not caplog.records


def test_protocol_path_entries_that_are_not_folders_warn(tmp_path, monkeypatch, caplog):
    missing, afile, good = tmp_path / "missing", tmp_path / "x.toml", tmp_path / "good"
    afile.write_text("", encoding="utf-8")
    good.mkdir()
    monkeypatch.setenv("CLEIHC_PROTOCOL_PATH", protocol_mod.os.pathsep.join(map(str, (missing, afile, good))))
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        folders = protocol_mod.protocol_search_path()
        protocol_mod.protocol_search_path()
    assert good in folders and missing not in folders and afile not in folders
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and str(missing) in warned[0] and str(afile) in warned[0]


def test_area_protocol_warns_about_ignored_cells_keys(tmp_path, caplog):
    text = builtin_text("gag-alcian").replace("[cells]\n", '[cells]\ncompartment = "membrane"\n')
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        load_protocol(write(tmp_path, text, "gag-alcian.toml"))
    assert len(caplog.records) == 1 and "[cells] compartment is ignored" in caplog.text
    # the resolved TOML that `cleihc protocols show` prints has every [cells] default: it loads silently
    caplog.clear()
    shown = write(tmp_path, load_protocol("gag-alcian").to_toml(), "gag-alcian.toml")
    with caplog.at_level(logging.WARNING, logger="cleihc.protocol"):
        load_protocol(shown)
    assert not caplog.records


def test_builtins_say_what_halo_um_does():
    for name in BUILTINS:
        text = builtin_text(name)
        assert "`halo_um` is only a floor" in text, name
        assert "change speed only" in text and "(`halo_um`) change speed only" not in text, name
    assert "floor" in (protocol_mod.AnalysisParams.__doc__ or "")
