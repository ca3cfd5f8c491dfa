"""The ``cleihc protocols`` and ``cleihc stains`` commands."""

from __future__ import annotations

import json
import tomllib

import pytest

from cleihc import stains
from cleihc.cli import main
from cleihc.protocol import load_protocol
from cleihc_testdata import SCANNER_GLASS, SCANNER_HDAB, two_stain_slide


def test_protocols_lists_builtins(capsys):
    assert main(["protocols"]) == 0
    out = capsys.readouterr().out
    for name in ("cd3", "cd4", "cd8", "cxcl10", "gag-alcian", "gag-colloidal-iron"):
        assert f"\n{name} " in "\n" + out
    assert "search path:" in out
    assert main(["protocols", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["cd3"]["version"] == "1.1.1" and listed["cd3"]["path"].endswith("cd3.toml")


def test_protocols_show_prints_resolved_toml_with_sha(capsys, tmp_path):
    assert main(["protocols", "show", "cd3"]) == 0
    out = capsys.readouterr().out
    proto = load_protocol("cd3")
    assert proto.sha256 in out
    data = tomllib.loads(out)
    assert data["cells"]["compartment"] == "membrane"
    assert "nucleus_threshold_od" in data["cells"]  # defaults are explicit
    path = tmp_path / "shown.toml"
    path.write_text(out, encoding="utf-8")
    assert load_protocol(path).sha256 == proto.sha256
    assert main(["protocols", "show", "cd3", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["sha256"] == proto.sha256 and js["protocol"]["name"] == "cd3"


def test_protocols_show_unknown_is_one_line_usage_error(capsys):
    # exit 2, as `cleihc quantify --protocol cd99` does: the argument is wrong, nothing failed
    assert main(["protocols", "show", "cd99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no protocol named 'cd99'" in err and "cd3" in err


def test_protocols_show_invalid_is_one_line_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    text = load_protocol("cd3").to_toml().replace("superficial_um = 500.0", "superficial_um = 100.0")
    path.write_text(text, encoding="utf-8")
    assert main(["protocols", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        f"cleihc protocols: error: {path}: [compartments] superficial_um = 100.0: must be greater"
    )


def test_protocols_list_by_lookup_name_with_origin(tmp_path, monkeypatch, capsys):
    local = tmp_path / "protocols"
    local.mkdir()
    cd3_copy = load_protocol("cd3").to_toml()  # keeps [protocol] name = "cd3"
    (local / "my-cd3.toml").write_text(cd3_copy, encoding="utf-8")
    (local / "cd4.toml").write_text(load_protocol("cd4").to_toml(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLEIHC_PROTOCOL_PATH", raising=False)
    assert main(["protocols"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("search path: ")
    # two lines per protocol: name, version, description; then where it comes from
    where = {lines[k].split()[0]: lines[k + 1].strip() for k in range(0, len(lines) - 1, 2)}
    names = [lines[k].split()[0] for k in range(0, len(lines) - 1, 2)]
    assert names.count("cd3") == 1 and "my-cd3" in names  # cd3 was listed twice and my-cd3 not at all
    assert where["cd3"].startswith("built-in: ")
    assert where["my-cd3"].startswith("./protocols: ") and "[protocol] name = 'cd3'" in where["my-cd3"]
    assert where["cd4"].startswith("./protocols: ") and where["cd4"].endswith("shadows the built-in cd4")
    assert main(["protocols", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["my-cd3"]["protocol_name"] == "cd3" and listed["my-cd3"]["origin"] == "./protocols"
    assert [d["origin"] for d in listed["cd4"]["shadows"]] == ["built-in"] and listed["cd3"]["shadows"] == []


def test_stains_presets(capsys):
    assert main(["stains", "presets"]) == 0
    out = capsys.readouterr().out
    assert "colloidal_iron_nfr" in out and "dab [0.2681, 0.5703, 0.7764]" in out


TRUTH = stains.StainMatrix(("hematoxylin", "dab"), [list(v) for v in SCANNER_HDAB])
GLASS = SCANNER_GLASS


synthetic_slide = two_stain_slide


def test_stains_estimate_macenko_and_write(tmp_path, capsys):
    slide = synthetic_slide(tmp_path)
    out_path = tmp_path / "cd3-lab.toml"
    code = main(
        ["stains", "estimate", str(slide), "--protocol", "cd3", "--mpp", "2.0", "--write", str(out_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "method:      macenko" in out
    assert "I0 = RGB 241.0 238.0 246.0" in out
    written = load_protocol(out_path)
    assert written.version == "1.2.0" and written.name == "cd3-lab"  # named after its file
    assert written.stains.estimate == "fixed" and written.background.rgb == (241.0, 238.0, 246.0)
    for name in ("hematoxylin", "dab"):
        assert stains.angle_deg(written.stains.matrix.vector(name), TRUTH.vector(name)) < 2.0
    # the reference was ~5 degrees away, and the command says so
    ref = load_protocol("cd3").stains.matrix
    assert stains.angle_deg(ref.vector("hematoxylin"), TRUTH.vector("hematoxylin")) > 3
    assert "angle" in out and "ok" in out
    # A protocol file that exists (maybe edited by hand) is not replaced unless asked; then it is kept.
    out_path.write_text(out_path.read_text() + "# my edit\n")
    edited = out_path.read_text()
    args = ["stains", "estimate", str(slide), "--protocol", "cd3", "--mpp", "2.0", "--write", str(out_path)]
    assert main(args) == 2
    assert f"{out_path} exists; give another --write file, or --force" in capsys.readouterr().err
    assert out_path.read_text() == edited
    assert main([*args, "--force"]) == 0
    (kept,) = tmp_path.glob("cd3-lab.toml.*.bak")
    assert kept.read_text() == edited and "# my edit" not in out_path.read_text()


def test_stains_estimate_from_single_stain_regions(tmp_path, capsys):
    slide = synthetic_slide(tmp_path)
    regions = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[80, 80], [180, 80], [180, 320], [80, 320], [80, 80]]],
                },
                "properties": {"objectType": "annotation", "classification": {"name": "hematoxylin"}},
            },
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[220, 80], [320, 80], [320, 320], [220, 320], [220, 80]]],
                },
                "properties": {"objectType": "annotation", "classification": {"name": "dab"}},
            },
        ],
    }
    rpath = tmp_path / "rois.geojson"
    rpath.write_text(json.dumps(regions), encoding="utf-8")
    from cleihc.cli.stains import estimate_for_slide

    result = estimate_for_slide(slide, protocol="cd3", regions=rpath, mpp=2.0)
    assert result["method"] == "regions"
    est = result["stains"]
    # mean OD of pixels with a 0-5 % admixture of the other stain: within 2 degrees of the truth
    for name in ("hematoxylin", "dab"):
        assert stains.angle_deg(est.vector(name), TRUTH.vector(name)) < 2.0
    # regions with other names: Macenko inside them (here: the whole tissue square, as one region)
    regions["features"] = regions["features"][:1]
    regions["features"][0]["geometry"]["coordinates"] = [
        [[70, 70], [330, 70], [330, 330], [70, 330], [70, 70]]
    ]
    regions["features"][0]["properties"]["classification"]["name"] = "my roi"
    rpath.write_text(json.dumps(regions), encoding="utf-8")
    result = estimate_for_slide(slide, protocol="cd3", regions=rpath, mpp=2.0)
    assert result["method"] == "macenko"
    assert result["pixels"] == 260 * 260
    for name in ("hematoxylin", "dab"):
        assert stains.angle_deg(result["stains"].vector(name), TRUTH.vector(name)) < 2.0


def test_stains_estimate_missing_slide_is_one_line_error(tmp_path, capsys):
    assert main(["stains", "estimate", str(tmp_path / "absent.svs"), "--mpp", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.svs" in err


@pytest.mark.parametrize("argv", [["stains"], ["stains", "estimate"]])
def test_stains_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
