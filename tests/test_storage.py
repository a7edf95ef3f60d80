"""The filesystem layer (mage_ray.storage) on local paths, file:// URIs and a real S3-compatible server (moto, started
by the ``s3_bucket`` fixture in conftest.py), and every artifact routed through it: stage records, rollouts, sweep
trial rewards and reports, adapters, value models, PBLoRA files, model directories, bundles, evaluation reports,
exports. The pipeline's resume over ``s3://`` is rehearsed with configs/summary.yaml (tests/test_rehearse.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from bundle_factory import cached_tiny_bundle

from mage_ray import storage
from mage_ray.bundle import build_bundle, load_bundle, save_bundle
from mage_ray.config import load_config
from mage_ray.manifest import write_manifest
from mage_ray.storage import (
    atomic_file,
    exists,
    is_dir,
    is_file,
    join,
    listdir,
    local_copy,
    mtime,
    publish_dir,
    read_bytes,
    read_text,
    remove,
    write_bytes_atomic,
    write_text_atomic,
)

KINDS = ["local", "file", "s3"]


def _location(kind: str, tmp_path: Path, request) -> str:
    """A fresh directory location of ``kind``: a local path, a file:// URI, or a prefix in the test bucket."""
    if kind == "local":
        return str(tmp_path / "store")
    if kind == "file":
        return "file://" + str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=KINDS)
def where(request, tmp_path) -> str:
    return _location(request.param, tmp_path, request)


def _tree(d: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def _listing(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (local or URI) -> its bytes."""
    out = {}
    for name in listdir(root):
        p = join(root, name)
        if is_dir(p):
            out.update({f"{name}/{k}": v for k, v in _listing(p).items()})
        else:
            out[name] = read_bytes(p)
    return out


# ---------------------------------------------------------------------------------------------
# The layer's functions


def test_files_and_queries(where, tmp_path):
    path = join(where, "a", "b.txt")
    assert not exists(path) and not exists(where)
    write_text_atomic(path, "h\u00e9llo")
    write_bytes_atomic(join(where, "c.bin"), b"\x00\x01")
    assert read_text(path) == "h\u00e9llo" and read_bytes(join(where, "c.bin")) == b"\x00\x01"
    assert exists(path) and is_file(path) and not is_dir(path)
    assert is_dir(join(where, "a")) and not is_file(join(where, "a"))
    assert listdir(where) == ["a", "c.bin"] and listdir(join(where, "a")) == ["b.txt"]
    assert mtime(path) > 0
    if where.startswith("file://"):  # file:// is the local path, scheme stripped
        assert (tmp_path / "store" / "a" / "b.txt").read_text() == "h\u00e9llo"
    with pytest.raises(OSError):
        read_bytes(join(where, "missing"))
    with pytest.raises(FileNotFoundError):
        listdir(join(where, "missing"))
    remove(join(where, "a"))
    assert not exists(path) and listdir(where) == ["c.bin"]


def test_atomic_file_is_all_or_nothing(where):
    path = join(where, "f.json")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert not exists(path)
    with atomic_file(path) as tmp:
        tmp.write_text("whole")
    assert read_text(path) == "whole"


def test_publish_dir_replaces_the_old_directory(where, tmp_path):
    dest = join(where, "artifact")
    publish_dir(_tree(tmp_path / "old", {"stale.bin": b"old", "manifest.json": b"{}"}), dest)
    new = {"manifest.json": b'{"status": "complete"}', "adapter/w.safetensors": b"w", "y.txt": b"y"}
    publish_dir(_tree(tmp_path / "new", new), dest)
    assert _listing(dest) == new


def test_publish_dir_uploads_the_completion_files_last(s3_bucket, tmp_path, monkeypatch):
    """On an object store the manifest / bundle.json go up after every other file: their presence is the mark."""
    order = []
    upload = storage._upload_file
    monkeypatch.setattr(storage, "_upload_file", lambda src, dest: (order.append(dest), upload(src, dest)))
    files = {
        "bundle.json": b"{}",
        "manifest.json": b"{}",
        "a/manifest.json": b"{}",
        "z.bin": b"z",
        "b.bin": b"b",
    }
    dest = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    publish_dir(_tree(tmp_path / "src", files), dest)
    assert sorted(order[-2:]) == [join(dest, "bundle.json"), join(dest, "manifest.json")]
    assert len(order) == len(files) and _listing(dest) == files


def test_local_copy_of_a_local_path_is_the_path(tmp_path):
    d = _tree(tmp_path / "d", {"x": b"1"})
    assert local_copy(d) == d and local_copy(f"file://{d}") == d


def test_local_copy_downloads_once_and_refreshes_when_the_manifest_changes(s3_bucket, tmp_path, monkeypatch):
    downloads = []
    download = storage._download_file
    monkeypatch.setattr(
        storage, "_download_file", lambda src, dest: (downloads.append(src), download(src, dest))
    )
    uri = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/adapter"
    files = {"manifest.json": b'{"v": 1}', "adapter/w.safetensors": b"weights", "head.bin": b"head"}
    publish_dir(_tree(tmp_path / "src", files), uri)
    cache = tmp_path / "cache"
    first = local_copy(uri, cache)
    assert first.is_dir() and not str(first).startswith(str(tmp_path / "src"))
    assert {str(p.relative_to(first)): p.read_bytes() for p in first.rglob("*") if p.is_file()} == files
    assert len(downloads) == 3
    assert local_copy(uri, cache) == first and len(downloads) == 3  # unchanged: the same copy, no download
    write_text_atomic(join(uri, "manifest.json"), '{"v": 2}')
    second = local_copy(uri, cache)
    assert second != first and first.is_dir()  # a new copy; the one before stays (a process may read it)
    assert (second / "manifest.json").read_text() == '{"v": 2}'
    assert (second / "adapter" / "w.safetensors").read_bytes() == b"weights"
    assert downloads[3:] == [join(uri, "manifest.json")]  # unchanged files came from the previous copy
    write_text_atomic(join(uri, "manifest.json"), '{"v": 3}')
    third = local_copy(uri, cache)
    assert (third / "manifest.json").read_text() == '{"v": 3}' and second.is_dir() and not first.exists()
    with pytest.raises(FileNotFoundError):
        local_copy(f"{s3_bucket}/no-such-dir", cache)


def test_local_copy_refreshes_on_a_new_manifest_even_when_the_listing_is_the_same(
    s3_bucket, tmp_path, monkeypatch
):
    """A store whose timestamps cannot tell two same-size writes apart (one-second resolution): the content of the
    completion file still gives a new copy."""
    uri = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/bundle"
    publish_dir(_tree(tmp_path / "src", {"bundle.json": b'{"gamma": 1}', "w.bin": b"w"}), uri)
    listing = storage._remote_files
    monkeypatch.setattr(storage, "_remote_files", lambda u: [(r, s, 0) for r, s, _ in listing(u)])
    first = local_copy(uri, tmp_path / "cache")
    write_text_atomic(join(uri, "bundle.json"), '{"gamma": 2}')
    second = local_copy(uri, tmp_path / "cache")
    assert second != first and (second / "bundle.json").read_text() == '{"gamma": 2}'


CONCURRENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mage_ray import storage
    uri, cache, start, log = sys.argv[1:5]
    download = storage._download_file
    def slow(src, dest):  # widen the window in which the processes overlap
        with open(log, "a") as f:
            f.write(src + "\\n")
        time.sleep(0.3)
        download(src, dest)
    storage._download_file = slow
    while not Path(start).exists():
        time.sleep(0.01)
    print(storage.local_copy(uri, cache))
    """
)


def test_local_copy_is_safe_when_several_processes_ask_at_once(s3_bucket, tmp_path, repo_root):
    uri = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/bundle"
    files = {"bundle.json": b"{}", "a.bin": b"a", "b/c.bin": b"c"}
    publish_dir(_tree(tmp_path / "src", files), uri)
    cache, start, log = tmp_path / "cache", tmp_path / "start", tmp_path / "downloads.log"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, uri, str(cache), str(start), str(log)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    start.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1  # every process got the same copy
    copy = Path(paths.pop())
    assert {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files
    assert len(log.read_text().splitlines()) == len(files)  # downloaded once, not once per process
    assert [d.name for d in copy.parent.iterdir() if d.is_dir()] == [copy.name]  # no temporary leftovers


# ---------------------------------------------------------------------------------------------
# Artifacts routed through the layer


def _cfg(storage_path: str, *overrides: str):
    return load_config(
        "configs/smoke.yaml", [f"storage.storage_path={storage_path}", "storage.run_name=r", *overrides]
    )


def test_config_strips_file_scheme(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert _cfg(f"file://{tmp_path}/runs").storage.run_dir == f"{tmp_path}/runs/r"


def test_stage_records_and_skip_line(where, repo_root, monkeypatch, capsys):
    from mage_ray.stages import _finish, skip_done, stage_done

    monkeypatch.chdir(repo_root)
    cfg = _cfg(where)
    assert stage_done(cfg, "beta") is None
    _finish(cfg, "beta", {"best": {"backbone.beta": 0.7}}, 0.0)
    rec = stage_done(cfg, "beta")
    assert rec["best"] == {"backbone.beta": 0.7} and skip_done(cfg, "beta", rec) == rec
    assert "[pipeline] stage 'beta': done at" in capsys.readouterr().out


def test_rollout_shards(where):
    import pyarrow as pa

    from mage_ray.train.rollouts import read_rollouts, rollout_files, write_shard

    d = join(where, "rollouts")
    for i in (1, 0):
        write_shard(
            pa.table({"prompt_index": [i], "x": [float(i)]}), join(d, f"shard-{i:05d}-of-00002.parquet")
        )
    write_manifest(d, {"status": "complete"})
    assert [f.rsplit("/", 1)[-1] for f in rollout_files(d)] == [
        "shard-00000-of-00002.parquet",
        "shard-00001-of-00002.parquet",
    ]
    assert read_rollouts(d).column("x").to_pylist() == [0.0, 1.0]


def test_sweep_trial_rewards_decision_and_report(where, repo_root, monkeypatch):
    from mage_ray.sweep import decide, save_trial_rewards, write_sweep_report

    monkeypatch.chdir(repo_root)
    cfg = _cfg(where, "eval.n_resamples=50")
    rng = torch.Generator().manual_seed(0)
    rows = []
    for a in (0.0, 0.2):  # (P preferences of the sweep grid, N prompts, n objectives) rewards per trial
        save_trial_rewards(cfg, "alpha", a, (torch.rand(3, 4, 2, generator=rng) + a).tolist())
        rows.append({"decode.alpha": a, "hv": 0.1 + a, "error": None})
    _, decision = decide(cfg, "alpha", "decode.alpha", rows, 0.0)
    assert "note" not in decision  # the per-prompt rewards were found and bootstrapped
    records = {"alpha": {"best": {"decode.alpha": 0.2}, "rows": rows, "decision": decision}}
    summary = {"beta": 0.7, "alpha": 0.2, "gamma": 1.0}
    md = write_sweep_report(cfg, summary, records, None)
    report = join(cfg.storage.run_dir, "report")
    assert md == join(report, "sweep.md") and "## alpha" in read_text(md)
    assert json.loads(read_text(join(report, "sweep.json"))) == {**summary, "guides": []}  # no guide trained
    assert read_bytes(join(report, "sweep_alpha.png"))[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return cached_tiny_bundle(tmp_path_factory)


def test_adapters_value_models_and_pblora_load_from_uris(s3_bucket, tiny_bundle):
    from mage_ray.lora_mix import load_adapter
    from mage_ray.pblora import load_pblora
    from mage_ray.value_model import load_value_model

    b = load_bundle(tiny_bundle)
    base = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    adapter = load_adapter(publish_dir(b.path(b.backbones[0]) / "adapter", join(base, "adapter")))
    ref = load_adapter(b.path(b.backbones[0]) / "adapter")
    assert adapter.modules.keys() == ref.modules.keys()
    assert all(torch.equal(adapter.modules[m][1], ref.modules[m][1]) for m in ref.modules)
    value = load_value_model(publish_dir(b.path(b.values[0]), join(base, "value")))
    assert torch.equal(value.head_weight, load_value_model(b.path(b.values[0])).head_weight)
    tensors, config = load_pblora(publish_dir(b.path(b.parm) / "pblora", join(base, "pblora")))
    ref_t, ref_c = load_pblora(b.path(b.parm) / "pblora")
    assert config == ref_c and all(torch.equal(tensors[k], ref_t[k]) for k in ref_t)


def test_model_directory_on_an_object_store_resolves_to_a_local_copy(s3_bucket, tiny_model_path):
    """The SFT stage's merged model lives under the run directory; on s3:// it becomes model.name_or_path."""
    from mage_ray.models import resolve_model_path

    uri = publish_dir(tiny_model_path, f"{s3_bucket}/{uuid.uuid4().hex[:8]}/sft/model")
    local = Path(resolve_model_path(uri))
    assert (
        local.is_dir()
        and (local / "config.json").read_bytes() == (Path(tiny_model_path) / "config.json").read_bytes()
    )


def test_wrpo_discovers_backbones_on_an_object_store(s3_bucket, tiny_bundle, repo_root, monkeypatch):
    from mage_ray.train.wrpo_sources import _is_adapter_dir, discover_sources

    monkeypatch.chdir(repo_root)
    cfg = _cfg(f"{s3_bucket}/{uuid.uuid4().hex[:8]}")
    b = load_bundle(tiny_bundle)
    done = publish_dir(b.path(b.backbones[0]), join(cfg.storage.run_dir, "backbones", "beta_1", "b0"))
    publish_dir(b.path(b.backbones[1]), join(cfg.storage.run_dir, "backbones", "beta_1", "b1"))
    remove(join(cfg.storage.run_dir, "backbones", "beta_1", "b1", "manifest.json"))  # not complete
    assert discover_sources(cfg) == [done] and _is_adapter_dir(done) == join(done, "adapter")


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_bundle_round_trip_through_a_uri_decodes_the_same_tokens(kind, tiny_bundle, tmp_path, request):
    """Artifacts at URIs (as stage records name them on object storage) -> build_bundle to a URI -> load_bundle of
    the URI -> the engine decodes what it decodes from the local bundle; its evaluation report and export go to
    the URI, and the playground finds the report beside the bundle."""
    from mage_ray.decode import Engine, Request
    from mage_ray.evaluate import evaluate
    from mage_ray.export import export_preference
    from mage_ray.serve.playground import _beside, front_json
    from mage_ray.tasks.objectives import get_objective

    local = load_bundle(tiny_bundle)
    base = _location(kind, tmp_path, request)
    arts = {
        key: [
            publish_dir(local.path(rel), join(base, "artifacts", f"{key}{i}")) for i, rel in enumerate(rels)
        ]
        for key, rels in (("backbones", local.backbones), ("values", local.values), ("arms", local.arms))
    }
    build_bundle(
        join(base, "bundle"),
        model=local.model_config(),
        objectives=local.objectives,
        beta=local.beta,
        gamma=local.gamma,
        default_method=local.default_method,
        parm=publish_dir(local.path(local.parm), join(base, "artifacts", "parm")),
        **arts,
    )
    assert is_file(join(base, "bundle", "bundle.json"))
    remote = load_bundle(join(base, "bundle"), cache_dir=tmp_path / "cache")
    assert remote.location == (join(base, "bundle") if kind == "s3" else str(tmp_path / "store" / "bundle"))
    same = ("base_model", "model", "objectives", "beta", "alpha", "gamma", "default_method")
    assert remote.root.is_dir() and {k: remote.to_json()[k] for k in same} == {
        k: local.to_json()[k] for k in same
    }
    save_bundle(
        dataclasses.replace(remote, method_gammas={"genarm": 2.0})
    )  # the ARM gammas: bundle.json only
    assert json.loads(read_text(join(base, "bundle", "bundle.json")))["method_gammas"] == {"genarm": 2.0}
    assert load_bundle(join(base, "bundle"), cache_dir=tmp_path / "cache").method_gammas == {"genarm": 2.0}
    reqs = [
        Request(p, [0.3, 0.7], method=m, max_new_tokens=5)
        for m in ("bs", "mage-e-m", "genarm", "parm")
        for p in ("Tell me about rivers.", "Hi")
    ]
    engine = Engine.from_bundle(remote)
    got = engine.generate(reqs)
    ref = Engine.from_bundle(local).generate(reqs)
    assert all(c.error is None for c in got)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]

    objectives = [get_objective(o) for o in remote.objectives]
    evaluate(
        engine,
        objectives,
        ["Tell me about rivers.", "Hi"],
        ["bs"],
        [[0.0, 1.0], [1.0, 0.0]],
        ref_point=[0.0, 0.0],
        out_dir=join(base, "report"),
        batch_size=4,
        progress=False,
        n_resamples=20,
    )
    for f in ("metrics.json", "metrics.md", "rewards.json", "generations.parquet", "samples.md", "front.png"):
        assert is_file(join(base, "report", f)), f
    assert front_json(remote.location, remote.objectives)["available"] is True  # ../report/metrics.json
    if kind == "s3":  # an object store has no "..": the report's key is resolved here
        assert _beside(remote.location, "../report/metrics.json") == join(base, "report", "metrics.json")

    record = export_preference(remote, [0.5, 0.5], join(base, "export"))
    assert record["bundle"] == remote.location
    assert json.loads(read_text(join(base, "export", "export.json")))["preference"] == [0.5, 0.5]
    assert is_file(join(base, "export", "adapter_model.safetensors"))
