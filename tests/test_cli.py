"""The command line: tables, --json, save/report, exit codes 0/1/2, quiet/verbose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxfactorize.cli import main

MODEL = ["--model", "cli_small_models:small_net"]
# small widths keep the tests fast; the thresholds are lowered to match
SMALL = [*MODEL, "--input-shape", "1x64x4x4", "--min-channels", "32", "--min-features", "32"]
SMALL += ["--latent-features", "16"]


@pytest.fixture(autouse=True)
def small_models(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module with model factories, importable as ``cli_small_models`` (like a user's package)."""
    folder = tmp_path_factory.getbasetemp() / "cli_models"
    folder.mkdir(exist_ok=True)
    (folder / "cli_small_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def small_net():
                return nn.Sequential(
                    nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(64, 80),
                )

            def not_a_model():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(folder))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_prints_the_table(capsys) -> None:
    code, out, _ = run(capsys, "plan", *SMALL)
    assert code == 0
    assert out.startswith("fxfactorize plan")
    assert "2 of 2 Linear/Conv layers factorized" in out


def test_plan_json_is_one_document(capsys) -> None:
    code, out, _ = run(capsys, "plan", *SMALL, "--latent-channels", "16", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["plan"]["kind"] == "plan"
    assert document["plan"]["layers"][0]["rank"] == 16


def test_options_before_the_subcommand_are_kept(capsys) -> None:
    code, out, _ = run(capsys, *SMALL, "--json", "plan", "--no-convs")
    assert code == 0
    layers = json.loads(out)["plan"]["layers"]
    assert layers[0]["reason"] == "convs=False" and layers[1]["rank"] == 16


def test_transform_saves_and_report_reads_it_back(capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "transform", *SMALL, "--out", str(out_dir), "-q")
    assert code == 0 and "saved to" in out
    assert (out_dir / "plan.json").exists() and (out_dir / "weights.pt").exists()
    code, out, _ = run(capsys, "report", str(out_dir))
    assert code == 0
    assert "fxfactorize report" in out and "(weights)" in out
    code, out, _ = run(capsys, "report", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["report"]["kind"] == "report"


def test_transform_solves_on_calibration_inputs_from_a_file(capsys, tmp_path: Path) -> None:
    import torch

    torch.save(torch.randn(6, 64, 4, 4), tmp_path / "inputs.pt")
    out_dir = tmp_path / "out"
    argv = [*SMALL, "--calibration", str(tmp_path / "inputs.pt"), "--out", str(out_dir), "--json"]
    code, out, _ = run(capsys, "transform", *argv)
    assert code == 0
    sources = {row["nmse_source"] for row in json.loads(out)["report"]["layers"] if row["rank"]}
    assert sources == {"calibration"}
    code, out, _ = run(capsys, "transform", *SMALL, "--out", str(tmp_path / "free"), "--json")
    sources = {row["nmse_source"] for row in json.loads(out)["report"]["layers"] if row["rank"]}
    assert code == 0 and sources == {"weights"}


def test_bad_calibration_files_are_usage_errors(capsys, tmp_path: Path) -> None:
    import torch

    code, _, err = run(capsys, "bench", *SMALL, "--calibration", str(tmp_path / "missing.pt"))
    assert code == 2 and "--calibration: no such file" in err
    torch.save({"not": "batches"}, tmp_path / "dict.pt")
    code, _, err = run(capsys, "bench", *SMALL, "--calibration", str(tmp_path / "dict.pt"))
    assert code == 2 and "must hold a tensor or a non-empty list" in err


def test_bench_reports_both_latencies(capsys) -> None:
    code, out, _ = run(capsys, "bench", *SMALL, "--repeats", "2", "--warmup", "0", "--json")
    assert code == 0
    times = json.loads(out)["median_seconds"]
    assert set(times) == {"original", "transformed"} and all(t > 0 for t in times.values())


def test_main_job_plans_transforms_checks_and_times(capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, *SMALL, "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
    assert code == 0
    for part in ("fxfactorize plan", "fxfactorize report", "all finite", "median ms", "saved to"):
        assert part in out
    assert (tmp_path / "plan.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--model", "nonsense"], "--model must be"),
        (["plan", *MODEL, "--input-shape", "1xfoo"], "--input-shape must look like"),
        (["plan", *SMALL, "--latent-channels", "0"], "latent_channels must be"),
        (["plan", "--model", "cli_small_models:missing"], "cannot import 'missing'"),
        (["plan", "--model", "cli_small_models:not_a_model"], "not a torch.nn.Module"),
        (["plan", "--bogus"], "unrecognized arguments"),
        (["transform", *SMALL, "--out", ""], "--out must name a directory"),
        (["plan", "--min-features", "many"], "invalid int value"),
        (["plan", *MODEL, "--input-shape", "2x64", "--channels-last"], "--channels-last needs"),
    ],
)
def test_usage_errors_exit_2(capsys, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_channels_last_converts_the_model_and_its_example() -> None:
    import torch

    from fxfactorize.cli import _prepare, build_parser

    for flag, expected in (([], False), (["--channels-last"], True)):
        run = _prepare(build_parser().parse_args(["plan", *SMALL, *flag]))
        conv = run.model[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) is expected
        assert run.example.is_contiguous() is not expected


def test_failures_exit_1_with_one_line(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "plan", *MODEL, "--input-shape", "1x3x4x4")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "ShapePropagationError" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "report", str(tmp_path))
    assert code == 1 and "LoadError" in err


def test_debug_shows_the_traceback(capsys) -> None:
    from fxfactorize.errors import ShapePropagationError

    with pytest.raises(ShapePropagationError):
        main(["plan", *MODEL, "--input-shape", "1x3x4x4", "--debug"])


def test_verbose_logs_and_quiet_does_not(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "transform", *SMALL, "--out", str(tmp_path), "-v", "--no-progress")
    assert code == 0
    assert "fxfactorize: INFO: 2 of 2 Linear/Conv layers factorized" in err
    code, _, err = run(capsys, "bench", *SMALL, "--repeats", "1", "-q")
    assert code == 0 and err == ""


def test_help_documents_every_config_field(capsys) -> None:
    import dataclasses

    from fxfactorize import FactorizeConfig

    code, out, _ = run(capsys, "--help")
    assert code == 0
    for field in dataclasses.fields(FactorizeConfig):
        assert "--" + field.name.replace("_", "-") in out
    assert "Exit codes" in out


def test_python_dash_m_exit_code_for_usage_errors() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fxfactorize", "plan", "--input-shape", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fxfactorize: error:")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["bench", *SMALL, "--repeats", "0"], "--repeats"),
        ([*SMALL, "--repeats", "-3"], "--repeats"),
        (["bench", *SMALL, "--warmup", "-1"], "--warmup"),
    ],
)
def test_timing_counts_are_checked_as_usage_errors(capsys, argv: list[str], option: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert f"argument {option}: must be >=" in err


@pytest.mark.parametrize("command", [["transform"], []])
def test_an_unwritable_out_is_a_usage_error_before_any_work(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    import fxfactorize

    def no_work(*args, **kwargs):
        raise AssertionError("the model was transformed before --out was checked")

    monkeypatch.setattr(fxfactorize, "transform", no_work)
    monkeypatch.setattr(fxfactorize, "plan", no_work)
    a_file = tmp_path / "weights.txt"
    a_file.write_text("")
    for out in (a_file, a_file / "inside"):
        code, out_text, err = run(capsys, *command, *SMALL, "--out", str(out))
        assert code == 2 and out_text == ""
        assert f"--out {str(out)!r}" in err and "is not a directory" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_out_directory_is_a_usage_error(capsys, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "transform", *SMALL, "--out", str(locked / "model"))
    assert code == 2 and "is not writable" in err


@pytest.fixture
def fake_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """An empty cache in tmp_path, no pinned profile, and a fake measurement (n, 2e9, 3e-6)."""
    from fxfactorize.costmodels import DeviceProfile, roofline, set_device_profile

    monkeypatch.setenv("FXFACTORIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(roofline.PROFILE_ENV, raising=False)
    monkeypatch.setattr(roofline, "_MEASURED", {})
    set_device_profile(None)
    calls: list[int] = []

    def measure(device, dtype):
        calls.append(1)
        return DeviceProfile(1e9 * len(calls), 2e9, 3e-6)

    monkeypatch.setattr(roofline, "_measure", measure)
    return calls


def test_profile_shows_remeasures_and_clears_the_cache(capsys, tmp_path: Path, fake_device) -> None:
    from fxfactorize.costmodels import roofline

    cache = tmp_path / "device_profiles.json"
    code, out, _ = run(capsys, "profile", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["source"] == "measured" and shown["flops_per_s"] == 1e9
    assert shown["key"] == roofline.profile_key() and shown["cache_file"] == str(cache)
    assert list(json.loads(cache.read_text())) == [shown["key"]]

    roofline._MEASURED.clear()  # a new process reads the cache
    code, out, _ = run(capsys, "profile")
    assert code == 0 and fake_device == [1]
    assert roofline.profile_key() in out and "1e+09" in out
    assert f"from: cache file {cache}" in out

    code, out, _ = run(capsys, "profile", "--remeasure", "--json")
    assert code == 0 and json.loads(out)["flops_per_s"] == 2e9 and fake_device == [1, 1]
    assert json.loads(cache.read_text())[roofline.profile_key()]["flops_per_s"] == 2e9

    code, out, _ = run(capsys, "profile", "--clear")
    assert code == 0 and str(cache) in out and not cache.exists()
    code, out, _ = run(capsys, "profile", "--clear")
    assert code == 0 and "no cache file" in out


def test_profile_names_an_environment_profile_and_rejects_bad_values(
    capsys, fake_device, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fxfactorize.costmodels import roofline

    monkeypatch.setenv(roofline.PROFILE_ENV, "5e10,1e10,0")
    code, out, _ = run(capsys, "profile")
    assert code == 0 and "from: $FXFACTORIZE_DEVICE_PROFILE" in out and fake_device == []
    code, _, err = run(capsys, "profile", "--dtype", "float99")
    assert code == 2 and "--dtype" in err
    code, _, err = run(capsys, "profile", "--clear", "--remeasure")
    assert code == 2 and "not allowed with" in err


def test_torchrun_shares_the_batches_and_rank_0_alone_prints_and_saves(
    capsys, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch

    torch.save(torch.randn(5, 64, 4, 4), tmp_path / "inputs.pt")
    argv = [*SMALL, "--calibration", str(tmp_path / "inputs.pt"), "-q"]
    code, _, _ = run(capsys, "transform", *argv, "--out", str(tmp_path / "one"))
    assert code == 0
    env = {**os.environ, "PYTHONPATH": str(tmp_path_factory.getbasetemp() / "cli_models")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "fxfactorize", "transform", *argv]
    command += ["--out", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("fxfactorize report") == 1  # rank 0 alone prints
    assert result.stdout.count("saved to") == 1
    one = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    assert one.keys() == two.keys()
    for key, value in one.items():
        error = (two[key].double() - value.double()).norm() / value.double().norm()
        assert error <= 1e-6, key
