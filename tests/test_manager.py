"""The model manager on real tiny checkpoints: caching, eviction, users, failed loads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from blip_app.core.devices import LoadOptions
from blip_app.errors import BusyError, ModelLoadError, UnknownModelError
from blip_app.models.engine import LoadedModel
from blip_app.models.loading import Loader
from blip_app.models.manager import GB, ModelManager
from blip_app.tasks.service import Service

RED = Image.new("RGB", (32, 32), "red")


@pytest.fixture()
def paths(tiny_checkpoints):
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


def footprint(path: str) -> int:
    return LoadedModel.load(ModelManager([path], LoadOptions(), loader=Loader()).ref(path)).model.get_memory_footprint()


def test_models_are_cached_and_listed_with_their_state(paths):
    manager = ModelManager(paths, LoadOptions(), loader=Loader())
    assert [s.state for s in manager.states()] == ["folder", "folder"]
    first = manager.get(paths[0])
    assert manager.get(paths[0]) is first
    states = {s.name: s for s in manager.states()}
    assert states[paths[0]].state == "loaded" and "on cpu" in states[paths[0]].detail
    assert states[paths[1]].state == "folder"


def test_only_offered_models_can_be_used(paths):
    manager = ModelManager(paths[:1], LoadOptions(), loader=Loader())
    with pytest.raises(UnknownModelError, match="is not offered on this server"):
        manager.get(paths[1])
    with pytest.raises(UnknownModelError, match="Unknown model: nonsense"):
        ModelManager(["nonsense"], LoadOptions(), loader=Loader())


def test_least_recently_used_model_is_evicted_within_the_budget(paths):
    budget = 1.5 * max(footprint(p) for p in paths) / GB
    manager = ModelManager(paths, LoadOptions(), memory_budget_gb=budget, loader=Loader())
    manager.get(paths[0])
    manager.get(paths[1])
    assert manager.loaded_names() == [paths[1]]
    manager.get(paths[0])
    assert manager.loaded_names() == [paths[0]]


def test_a_model_in_use_is_never_evicted(paths):
    budget = 1.5 * max(footprint(p) for p in paths) / GB
    manager = ModelManager(paths, LoadOptions(), memory_budget_gb=budget, busy_timeout_s=0.2, loader=Loader())
    with manager.use(paths[0]) as model:
        with pytest.raises(BusyError, match="try again"):
            manager.get(paths[1])
        assert model.model is not None and manager.loaded_names() == [paths[0]]
    manager.get(paths[1])  # once released, the switch goes through
    assert manager.loaded_names() == [paths[1]]


def test_a_failed_load_leaves_the_previous_model_serving(paths, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((Path(paths[0]) / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config))  # a BLIP-2 config without weights
    budget = 1.5 * footprint(paths[0]) / GB
    service = Service([paths[0], str(broken)], LoadOptions(), memory_budget_gb=budget)
    assert service.caption(paths[0], RED, preset="fast").text
    with pytest.raises(ModelLoadError, match="Could not load"):
        service.caption(str(broken), RED, preset="fast")
    assert service.manager.loaded_names() == [paths[0]]
    assert service.caption(paths[0], RED, preset="fast").text


def test_concurrent_requests_for_one_model_load_it_once(paths):
    loads = []

    def counting_loader(ref, options, **kwargs):
        loads.append(ref.name)
        return LoadedModel.load(ref, options, **kwargs)

    manager = ModelManager(paths, LoadOptions(), loader=Loader(load=counting_loader))
    results = []
    threads = [threading.Thread(target=lambda: results.append(manager.get(paths[0]))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [paths[0]] and len({id(r) for r in results}) == 1


def test_unload_frees_the_model(paths):
    manager = ModelManager(paths, LoadOptions(), loader=Loader())
    model = manager.get(paths[0])
    manager.unload(paths[0])
    assert manager.loaded_names() == [] and model.model is None and len(model.features) == 0


def test_a_full_disk_during_download_is_named_and_partial_files_removed(paths, tmp_path, monkeypatch):
    import errno

    import huggingface_hub

    blobs = tmp_path / "models--someone--blip2-test" / "blobs"

    def full_disk(repo_id, **kwargs):
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / "0123abcd.incomplete").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full_disk)
    service = Service([paths[0], "someone/blip2-test"], LoadOptions(cache_dir=str(tmp_path)))
    assert service.caption(paths[0], RED, preset="fast").text
    with pytest.raises(ModelLoadError, match="The disk is full"):
        service.caption("someone/blip2-test", RED, preset="fast")
    assert not list(blobs.glob("*.incomplete"))
    assert service.manager.loaded_names() == [paths[0]]
    assert service.caption(paths[0], RED, preset="fast").text


def test_no_network_during_download_is_named(paths, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    manager = ModelManager(["Salesforce/blip2-opt-2.7b"], LoadOptions(cache_dir=str(tmp_path)), loader=Loader())
    with pytest.raises(ModelLoadError, match="not in the local cache and could not be downloaded"):
        manager.get("Salesforce/blip2-opt-2.7b")
    assert [s.state for s in manager.states()] == ["download"]
    assert "about 15 GB" in manager.states()[0].detail
