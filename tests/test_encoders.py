"""Encoder weights: ImageNet from torchvision's hub cache (downloaded when missing), a clear stop
when the file is neither cached nor downloadable, and 'auto' refused."""

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision

from bevtrain.config import ConfigError, resolve_config
from bevtrain.model import build_encoder, encoders
from bevtrain.model.encoders import WeightsUnavailableError, ensure_backbone_weights

REPO = Path(__file__).resolve().parents[1]
RES18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub dir for the test (torch.hub.set_dir, restored afterwards)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(previous)


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine: name resolution fails as it does without internet."""

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_imagenet_weights_load_from_the_hub_cache(hub_dir, offline):
    reference = torchvision.models.resnet18(weights=None)  # random: not what any default gives
    cached = hub_dir / "checkpoints" / RES18_FILE
    assert cached == encoders.hub_checkpoint_path(encoders.imagenet_weights("res18"))
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    assert ensure_backbone_weights("res18", "imagenet") == cached
    for weights in ("imagenet", str(cached)):
        encoder = build_encoder("res18", 16, weights)
        torch.testing.assert_close(encoder.stem_to_layer2[0].weight, reference.conv1.weight, rtol=0, atol=0)
        torch.testing.assert_close(encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight,
                                   rtol=0, atol=0)
    assert ensure_backbone_weights("res18", "none") is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_encoder("res18", 16, str(hub_dir / "missing.pth"))


def test_missing_weights_offline_stop_fast_naming_url_and_cache_path(hub_dir, offline):
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        build_encoder("res18", 16, "imagenet")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "https://download.pytorch.org/models/" + RES18_FILE in msg
    assert str(hub_dir / "checkpoints" / RES18_FILE) in msg
    assert "encoder_weights=none" in msg
    assert not (hub_dir / "checkpoints" / RES18_FILE).exists()


def test_a_stalled_download_is_bounded(hub_dir, monkeypatch):
    """A server that accepts and never answers: the download gives up after DOWNLOAD_TIMEOUT_S."""

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            time.sleep(5)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/models/{RES18_FILE}"
        weights = type("W", (), {"url": url})()
        monkeypatch.setattr(encoders, "imagenet_weights", lambda encoder_type: weights)
        monkeypatch.setattr(encoders, "DOWNLOAD_TIMEOUT_S", 0.5)
        t0 = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="timed out"):
            ensure_backbone_weights("res18", "imagenet", progress=False)
        assert time.perf_counter() - t0 < 4
        assert socket.getdefaulttimeout() is None  # the process-wide default is restored
    finally:
        server.shutdown()


def test_auto_is_refused_with_what_to_use(tmp_path):
    with pytest.raises(ConfigError, match="'auto' was removed.*'imagenet'"):
        resolve_config({"encoder_weights": "auto"})
    preset = tmp_path / "old.yaml"
    preset.write_text("encoder_weights: auto\n")
    with pytest.raises(ConfigError, match=f"{preset}.*encoder_weights.*'auto' was removed"):
        resolve_config({"config": str(preset)})
    with pytest.raises(ValueError, match="'auto' was removed"):
        build_encoder("res18", 16, "auto")
    cfg, _ = resolve_config({})
    assert cfg.encoder_weights == "imagenet"
    for preset in ("rgb", "radar", "lidar"):
        cfg, _ = resolve_config({"config": str(REPO / "configs" / f"{preset}.yaml")})
        assert cfg.encoder_weights == "imagenet", preset
