"""fdino sweep: spec files and built-in studies, a resumable run of variants x seeds, the report."""

from __future__ import annotations

import json
import math

import pytest
from helpers import png_pixels

from fdino import cli
from fdino.sweep import STUDIES, SweepSpec, Variant, load_spec, run_folder, run_sweep, study_spec
from fdino.sweep.report import mean_std, reading

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path, text):
    path.write_text(text)
    return path


# --- specs ------------------------------------------------------------------------------------------------
def test_grid_file_expands_to_every_combination(tmp_path):
    spec = load_spec(
        write(
            tmp_path / "g.toml",
            'preset = "smoke"\nseeds = [1, 2]\n[config]\nepochs = 3\n[options]\nmax_steps = 7\n'
            "[grid]\nteacher_temp = [0.02, 0.04]\nteacher_momentum = [0.99, 0.996, 0.9995]\n",
        )
    )
    assert spec.name == "g" and spec.seeds == (1, 2) and len(spec.variants) == 6
    assert spec.variants[0] == Variant(
        "teacher_temp=0.02, teacher_momentum=0.99", (("teacher_temp", 0.02), ("teacher_momentum", 0.99))
    )
    assert [axis for axis, _ in spec.grid] == ["teacher_temp", "teacher_momentum"]
    runs = list(spec.runs())
    assert len(runs) == 12 and {r[2].seed for r in runs} == {1, 2}
    assert all(cfg.epochs == 3 and opts.max_steps == 7 for _, _, cfg, opts in runs)
    assert runs[-1][2].teacher_momentum == 0.9995 and runs[-1][2].teacher_temp == 0.04


def test_named_variants_and_errors_name_the_key(tmp_path):
    spec = load_spec(
        write(tmp_path / "v.toml", '[[variants]]\nname = "base"\n[[variants]]\nname = "flat"\nteacher_temp = 0.1\n')
    )
    assert [v.name for v in spec.variants] == ["base", "flat"] and spec.grid == ()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\] in \[grid\]"):
        load_spec(write(tmp_path / "a.toml", "[grid]\nbogus = [1, 2]\n"))
    with pytest.raises(ValueError, match=r"\[grid\] out_dim must be a non-empty list"):
        load_spec(write(tmp_path / "b.toml", "[grid]\nout_dim = 64\n"))
    with pytest.raises(ValueError, match=r"needs a name"):
        load_spec(write(tmp_path / "c.toml", "[[variants]]\nout_dim = 64\n"))
    with pytest.raises(ValueError, match=r"sweep variant 'hot': .*teacher_temp"):
        load_spec(write(tmp_path / "d.toml", '[[variants]]\nname = "hot"\nteacher_temp = -1.0\n'))
    with pytest.raises(ValueError, match="each once"):
        SweepSpec(name="x", seeds=(0, 0))
    with pytest.raises(ValueError, match="own non-empty name"):
        SweepSpec(name="x", variants=(Variant("a"), Variant("a")))
    with pytest.raises(ValueError, match="run_dir is set by the sweep"):
        SweepSpec(name="x", options=(("run_dir", "elsewhere"),))


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_study_builds_valid_variants(study):
    spec = study_spec(study, preset="small32_resnet", seeds=(0, 1, 2))
    cfgs = [cfg for _, seed, cfg, _ in spec.runs() if seed == 0]
    assert len(cfgs) == len(spec.variants) >= 3 and spec.study == study
    assert len({json.dumps(c.to_dict(), sort_keys=True) for c in cfgs}) == len(cfgs)  # every arm differs


def test_centering_sharpening_study_is_the_papers_two_by_two():
    spec = study_spec("centering-sharpening", preset="smoke")
    cfgs = {v.name: cfg for v, _, cfg, _ in spec.runs()}
    default, centering_only, sharpening_only, neither = cfgs.values()
    assert default.centering == "ema" and default.teacher_temp < default.student_temp
    assert centering_only.centering == "ema" and centering_only.teacher_temp == centering_only.student_temp
    assert centering_only.warmup_teacher_temp == centering_only.student_temp
    assert sharpening_only.centering == "none" and sharpening_only.teacher_temp == default.teacher_temp
    assert neither.centering == "none" and neither.teacher_temp == neither.student_temp


# --- the report's arithmetic and reading -------------------------------------------------------------------
def test_mean_std_is_the_sample_statistic():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([None, float("nan")]) is None


def test_reading_names_collapse_and_the_best_variant():
    def entry(knn, collapse=()):
        return {"knn_final": (knn, 0.0), "collapse": list(collapse)}

    results = {
        "variants": {
            "dino": entry(60.0),
            "centering only": entry(20.0, ["uniform"]),
            "no centering": entry(10.0, ["one-hot"]),
        },
        "baselines": {"knn_raw_pixels": (34.0, 0.0), "knn_init": (18.0, 0.0)},
    }
    text = "\n".join(reading(results))
    assert "centering only: collapsed to a uniform teacher" in text and "no centering: collapsed to a one-hot" in text
    assert "Best final k-NN top-1: dino (60.0%)" in text and "init (18.0%): dino." in text


# --- a whole sweep ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(two_class_folder):
    return two_class_folder


def tiny_spec(images, **changes):
    fields = dict(
        name="tiny",
        preset="smoke",
        seeds=(0, 1),
        options=(("data", str(images)), ("max_steps", 4), ("compile", False), ("workers", 0), ("progress", False),
                 ("tensorboard", False), ("eval_every", 2), ("eval_samples", 16), ("attention_images", 0)),
        variants=(Variant("t=0.04, m=0.9", (("teacher_temp", 0.04), ("center_momentum", 0.9))),
                  Variant("t=0.07, m=0.9", (("teacher_temp", 0.07), ("center_momentum", 0.9)))),
        grid=(("teacher_temp", (0.04, 0.07)), ("center_momentum", (0.9,))),
    )  # fmt: skip
    return SweepSpec(**{**fields, **changes})


@pytest.fixture(scope="module")
def swept(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    said = []
    results = run_sweep(tiny_spec(images), out, batched="off", say=said.append)
    return out, results, said


def test_sweep_trains_every_variant_and_seed_and_reports_them(swept):
    out, results, said = swept
    assert len(said) == 4 and all("training in" in line for line in said)
    assert set(results["variants"]) == {"t=0.04, m=0.9", "t=0.07, m=0.9"}
    for name, entry in results["variants"].items():
        assert entry["seeds_done"] == 2
        finals = []
        for seed in (0, 1):
            summary = json.loads((run_folder(out, name, seed) / "summary.json").read_text())
            assert summary["steps"] == 4
            finals.append(summary["knn_top1_teacher"])
        assert entry["knn_final"] == pytest.approx(mean_std(finals))  # mean +- std over the two seeds
        assert entry["teacher_entropy_end"] is not None and math.isfinite(entry["kl_end"][0])
    # Different seeds are different runs (initialization and data order).
    a = json.loads((run_folder(out, "t=0.04, m=0.9", 0) / "run.json").read_text())["config"]
    b = json.loads((run_folder(out, "t=0.04, m=0.9", 1) / "run.json").read_text())["config"]
    assert (a["seed"], b["seed"]) == (0, 1)
    md = (out / "results.md").read_text()
    assert md.count("| t=0.0") == 2 and "raw pixels" in md and "## Reading (automatic)" in md
    png_pixels(out / "curves.png", size=(400, 1500))
    png_pixels(out / "heatmap.png")


def test_sequential_runs_start_from_a_clean_compile_cache(images, tmp_path, monkeypatch):
    # dynamo keeps 8 graphs per function: without a reset, a sweep's 9th config would train eager.
    resets, trained = [], []
    monkeypatch.setattr("torch._dynamo.reset", lambda: resets.append(len(trained)))
    monkeypatch.setattr("fdino.train.run", lambda cfg, opts, **_: trained.append(cfg))
    spec = tiny_spec(images, seeds=(0,))
    spec = SweepSpec(**{**spec.__dict__, "options": (*spec.options, ("compile", True))})
    run_sweep(spec, tmp_path, batched="off", say=lambda _: None)
    assert resets == [0, 1] and len(trained) == 2  # a reset before each run


def test_rerun_keeps_finished_runs_and_resumes_interrupted_ones(swept, images):
    out, results, _ = swept
    kept = run_folder(out, "t=0.07, m=0.9", 1) / "summary.json"
    before = kept.stat().st_mtime_ns
    interrupted = run_folder(out, "t=0.04, m=0.9", 0)
    (interrupted / "summary.json").unlink()  # as if killed after its last checkpoint
    said = []
    again = run_sweep(tiny_spec(images), out, batched="off", say=said.append)
    assert sum("finished earlier, kept" in line for line in said) == 3
    assert [line for line in said if "resuming" in line] == [f"[1/4] t=0.04, m=0.9, seed 0: resuming {interrupted}"]
    assert kept.stat().st_mtime_ns == before
    assert again["variants"]["t=0.04, m=0.9"]["knn_final"] == pytest.approx(
        results["variants"]["t=0.04, m=0.9"]["knn_final"]
    )
    with pytest.raises(FileExistsError, match="holds another sweep"):
        run_sweep(tiny_spec(images, seeds=(0,)), out)


def test_sweep_command_line_errors(tmp_path):
    assert cli.main(["sweep"]) == 2
    assert cli.main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert cli.main(["sweep", "--study", "out-dim", "--seeds", "a,b"]) == 2
