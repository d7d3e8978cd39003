"""Checkpoint source resolution: local-looking paths never reach the hub; hub failures say what to do.

`huggingface_hub.snapshot_download` is replaced in every test, so nothing here touches the network.
"""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from kronos_kit.model import CheckpointNotFoundError, Kronos


@pytest.fixture
def hub(monkeypatch):
    """Record hub calls; `hub.fail` makes the fake raise instead of answering."""

    class Hub:
        calls: list[str] = []
        fail: Exception | None = None
        folder = None

    def fake_snapshot_download(repo_id, **kwargs):
        Hub.calls.append(repo_id)
        if Hub.fail is not None:
            raise Hub.fail
        return str(Hub.folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return Hub


@pytest.mark.parametrize("source", ["runs/typo", "runs/typo/predictor/best", "./typo", "../typo",
                                    "~/no-such-kit-folder", "/no/such/kit/folder", "owner/name/sub"])
def test_local_looking_missing_paths_fail_without_the_network(hub, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="folder not found") as err:
        Kronos.from_pretrained(source)
    assert repr(source) in str(err.value)
    assert hub.calls == []


def test_a_missing_path_under_an_existing_folder_is_local_and_lists_nearby_folders(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "predictor_best").mkdir(parents=True)
    (tmp_path / "checkpoints" / "tokenizer_best").mkdir()
    with pytest.raises(FileNotFoundError, match="folder not found") as err:
        Kronos.from_pretrained("checkpoints/predictor-best")  # one slash, but `checkpoints` is a local folder
    assert "predictor_best" in str(err.value)  # the closest folder is suggested
    assert hub.calls == []


def test_a_path_object_is_always_local(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    with pytest.raises(CheckpointNotFoundError, match="folder not found"):
        Kronos.from_pretrained(Path("owner/name"))
    assert hub.calls == []


def test_an_explicit_hub_id_goes_to_the_hub(hub, tmp_path, monkeypatch, reference_dirs):
    monkeypatch.chdir(tmp_path)
    hub.folder = reference_dirs["predictor"]
    Kronos.from_pretrained("NeoQuasar/Kronos-small")
    assert hub.calls == ["NeoQuasar/Kronos-small"]


@pytest.mark.parametrize("offline", [False, True])
def test_weights_that_cannot_be_fetched_give_a_clear_message(hub, tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.fail = LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
    with pytest.raises(CheckpointNotFoundError, match="could not be fetched") as err:
        Kronos.from_pretrained("NeoQuasar/Kronos-small")
    message = str(err.value)
    assert "'NeoQuasar/Kronos-small'" in message and "local folder" in message and "config.json" in message
    assert ("HF_HUB_OFFLINE" in message) == offline
    assert isinstance(err.value.__cause__, LocalEntryNotFoundError)


def test_local_files_only_is_named_when_the_cache_lacks_the_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.fail = LocalEntryNotFoundError("not in cache")
    with pytest.raises(CheckpointNotFoundError, match="local_files_only"):
        Kronos.from_pretrained("NeoQuasar/Kronos-small", local_files_only=True)


def test_an_unreachable_hub_is_a_clear_message(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.fail = OSError("Connection refused")
    with pytest.raises(CheckpointNotFoundError, match="could not be fetched.*Connection refused"):
        Kronos.from_pretrained("owner/name")


def test_an_unknown_single_name_suggests_presets(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="neither an existing folder.*did you mean 'tiny'"):
        Kronos.from_pretrained("tinny")
    assert hub.calls == []
