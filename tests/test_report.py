"""`fdino report RUN_DIR`: one self-contained HTML page of a real (tiny, eager) training run, the
same page for a run still in progress (no summary.json), and clear errors for folders that are not runs."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import pytest
import torch

from fdino import presets
from fdino.cli import main
from fdino.report import parse_metrics, write_report
from fdino.train import TrainOptions, run

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PageParts(HTMLParser):
    """The <img> tags (attributes), the <h2> headings and every src/href of a page, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.headings, self.links, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "h2":
            self._in_h2 = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings[-1] += data


def parse(path) -> PageParts:
    parts = PageParts()
    parts.feed(path.read_text(encoding="utf-8"))
    parts.close()
    return parts


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step eager smoke run on shapes10 (ViT: attention/teacher.png), plus embedding snapshots."""
    root = tmp_path_factory.mktemp("report") / "run"
    opts = TrainOptions(
        data="shapes10", run_dir=str(root), compile=False, workers=0, log_every=2, ckpt_every=10**6, max_steps=6,
        eval_every=3, eval_samples=40, attention_images=2, progress=False, tensorboard=False, trackers="none",
        embedding_snapshots=False,  # the snapshots below are placed by hand, out of order
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # `one_thread` is per test and comes after this module fixture: several times faster on 2 busy cores
    try:
        run(presets.smoke(), opts)
    finally:
        torch.set_num_threads(threads)
    (root / "embeddings").mkdir()
    for step in (10, 2):  # written out of order: the page must sort by number, not as text
        shutil.copy(root / "curves.png", root / "embeddings" / f"step-{step}.png")
    return root


@pytest.fixture(scope="module")
def page(run_dir):
    return write_report(run_dir)


def test_page_has_every_section_and_only_inline_pngs(run_dir, page):
    assert page == run_dir / "report.html"
    parts = parse(page)
    assert parts.headings == [
        "Config", "k-NN history vs baselines", "Training curves", "Embedding snapshots", "Attention maps",
    ]  # fmt: skip
    # k-NN plot, training curves, curves.png, 2 embedding snapshots, attention/teacher.png
    assert len(parts.images) == 6
    for image in parts.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix), image["src"][:60]
        assert base64.b64decode(image["src"][len(prefix) :], validate=True).startswith(PNG_MAGIC)
    assert not [link for link in parts.links if re.match(r"https?://", link)]
    assert "http://" not in page.read_text() and "https://" not in page.read_text()


def test_header_shows_the_summary_numbers(run_dir, page):
    summary = json.loads((run_dir / "summary.json").read_text())
    text = page.read_text()
    for key in ("knn_top1_teacher", "knn_top1_raw_pixels", "knn_top1_init"):
        assert f"{summary[key]:.2f}%" in text, key
    assert f"<td>{summary['steps']} / {summary['total_steps']}</td>" in text
    assert "shapes10" in text and "vit_tiny_patch16_224" in text
    assert "no summary yet" not in text


def test_config_table_shows_values_compactly(page):
    text = page.read_text()
    assert "<tr><td>teacher_temp</td><td>0.04</td>" in text
    assert "<td>backbone_kwargs</td><td>embed_dim=32, depth=2, num_heads=2</td>" in text
    assert "<tr><td>max_steps</td><td>6</td></tr>" in text


def test_collapse_verdict_comes_from_the_shared_rule(page):
    verdict = re.search(
        r"<p>Collapse verdict at step (\d+) \(the last logged\): (\w[\w -]*) \(K = 64", page.read_text()
    )
    assert verdict, "no collapse verdict line"
    assert verdict.group(1) == "6" and verdict.group(2) in ("none", "uniform teacher", "one-hot teacher")


def test_snapshots_appear_in_numeric_step_order(page):
    alts = [image["alt"] for image in parse(page).images]
    assert [a for a in alts if a.startswith("embeddings")] == ["embeddings, step 2", "embeddings, step 10"]
    assert "attention, teacher" in alts


def test_run_in_progress_still_gets_a_report(run_dir, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(run_dir, live, ignore=shutil.ignore_patterns("*.pt", "report.html"))
    total = json.loads((live / "summary.json").read_text())["total_steps"]
    (live / "summary.json").unlink()
    partial = len((live / "metrics.jsonl").read_text().splitlines()) + 1
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 4.1\n')  # a partial last line, as a killed writer leaves it
    with pytest.warns(UserWarning, match=f"line {partial} is not valid JSON"):
        page = write_report(live, live / "out" / "page.html")
    parts, text = parse(page), page.read_text()
    assert "This run has no summary yet" in text and f"line {partial} is not valid JSON" in text
    assert "k-NN history vs baselines" not in parts.headings  # its numbers live in summary.json
    assert "Training curves" in parts.headings and "Config" in parts.headings
    assert f"<td>6 / {total}</td>" in text  # steps logged so far / the config's schedule
    assert "wall time so far" in text


def test_parse_metrics_keeps_the_last_write_of_a_step_and_the_events():
    text = '{"step": 2, "loss": 1}\n\n{"event": "collapse_warning", "message": "m"}\n[1]\n{"step": 2, "loss": 3}\n'
    records, events, notes = parse_metrics(text)
    assert records == [{"step": 2, "loss": 3}] and events == [{"event": "collapse_warning", "message": "m"}]
    assert notes == ["metrics.jsonl line 4 is neither a step record nor an event; skipped it"]


def test_cli_writes_the_page_and_prints_its_path(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")


def test_cli_errors_name_the_problem_and_the_fix(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "fdino train" in err and "Traceback" not in err
    (tmp_path / "stuff").mkdir()
    assert main(["report", str(tmp_path / "stuff")]) == 2
    err = capsys.readouterr().err
    assert "not an fdino run folder" in err and "run `fdino train" in err
