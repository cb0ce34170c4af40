"""FID (nvae_fast.train.fid, ``nvae-fast fid``).

Three levels, by what the machine has:

* always: pytorch-fid replaced by a stand-in with its interface (tests/fid_fixtures.py), so the
  whole plumbing runs: sample generation, the images handed to the library (format, range,
  channels, batches), the statistics against numpy's, the reference-statistics cache, the
  weights' download and hash check, official statistics files, errors;
* pytorch-fid importable (a torchvision that matches torch): the library's real network, with
  random weights, behind the same plumbing;
* the FID Inception weights in torch.hub's cache as well: the real FID against pytorch-fid's own
  computation on the same images.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nvae_fast.train import fid
from nvae_fast.train.datasets import build_datasets
from nvae_fast.train.errors import InputError, NonFiniteSamples

import fid_fixtures
from sampling_fixtures import tiny_digits_model

pytestmark = pytest.mark.usefixtures("small_cpu_convs")

REAL_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _digits():
    return build_datasets("digits", None, image_size=8, channels=1, seed=0)


def _fid(model, features, library, tmp_path, logs=None, **kwargs):
    train, test = _digits()
    kwargs = {"num_samples": 120, "batch_size": 50, **kwargs}
    return fid.evaluate_fid(model, train, test, dataset="digits", data_format="digits", data=None, features=features,
                            library=library, fid_dir=tmp_path / "fid", progress=False,
                            log=(logs if logs is not None else []).append, **kwargs)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    downloads = fid_fixtures.install(monkeypatch, tmp_path / "hub")
    library = fid.load_library()
    return library, fid.InceptionFeatures("cpu", library), downloads


def test_feature_stats_match_numpy_for_large_offsets():
    rng = np.random.default_rng(0)
    data = 1e3 + rng.standard_normal((37, 5)) * np.array([1e-3, 1, 10, 0.5, 2])
    stats = fid.FeatureStats()
    for chunk in np.array_split(data, 4):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.result()
    expected = data.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, expected.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(expected, rowvar=False), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        one = fid.FeatureStats()
        one.update(torch.zeros(1, 5))
        one.result()


def test_fid_hands_the_library_what_the_official_code_does(stand_in, tmp_path):
    library, features, downloads = stand_in
    hub_file = tmp_path / "hub" / "checkpoints" / fid_fixtures.WEIGHTS_NAME
    assert downloads == [(fid_fixtures.URL, str(hub_file), fid_fixtures.PREFIX)] and features.weights == hub_file
    model = tiny_digits_model()
    train, _ = _digits()
    logs = []
    torch.manual_seed(3)
    result = _fid(model, features, library, tmp_path, logs)

    inputs = fid_fixtures.FakeInceptionV3.inputs
    for x in inputs:  # float32 RGB in [0, 1]; grey images repeated to three channels
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    reference, samples = inputs[:-3], inputs[-3:]
    assert sum(len(x) for x in reference) == len(train) == 1497  # the training split, not binarised
    assert [len(x) for x in samples] == [50, 50, 20]
    torch.manual_seed(3)
    with torch.no_grad():
        expected = torch.cat([model.mean_image(model.sample(n, 1.0)) for n in (50, 50, 20)])
    assert torch.equal(torch.cat(samples)[:, :1], expected)  # t = 1, the mean of p(x|z)

    mu_ref, sigma_ref, mu, sigma = fid_fixtures.distances[-1]
    k = fid_fixtures.FEATURES  # the stand-in's features beyond the first k are zero
    for (m, s), images in (((mu_ref, sigma_ref), torch.stack([train[i] for i in range(len(train))])),
                           ((mu, sigma), expected)):
        feats = fid_fixtures.features_of(images)[:, :k]
        np.testing.assert_allclose(m[:k], feats.mean(0), atol=1e-6)
        np.testing.assert_allclose(s[:k, :k], np.cov(feats, rowvar=False), atol=1e-6)
        assert not m[k:].any() and not s[k:].any() and not s[:, k:].any()
    assert result.fid == fid_fixtures.calculate_frechet_distance(mu_ref, sigma_ref, mu, sigma) > 0
    assert (result.num_samples, result.temperature, result.reference_images) == (120, 1.0, 1497)
    assert logs[0].startswith("computed FID reference statistics of 1497 digits images (train)")

    # The reference statistics are cached: the next run reads no data, only generates.
    cache = Path(result.reference)
    assert cache.parent == tmp_path / "fid" and cache.name.startswith("digits-")
    fid_fixtures.FakeInceptionV3.inputs.clear()
    logs.clear()
    _fid(model, features, library, tmp_path, logs, num_samples=3)
    assert [len(x) for x in fid_fixtures.FakeInceptionV3.inputs] == [3] and logs[0].startswith("cached")
    np.testing.assert_array_equal(fid_fixtures.distances[-1][1], sigma_ref)
    # Another reference size is another entry; an unreadable entry is computed again.
    fid_fixtures.FakeInceptionV3.inputs.clear()
    other = Path(_fid(model, features, library, tmp_path, num_samples=2, num_reference=100).reference)
    assert sum(len(x) for x in fid_fixtures.FakeInceptionV3.inputs) == 102 and other != cache
    other.write_bytes(b"garbage")
    fid_fixtures.FakeInceptionV3.inputs.clear()
    _fid(model, features, library, tmp_path, num_samples=2, num_reference=100)
    assert sum(len(x) for x in fid_fixtures.FakeInceptionV3.inputs) == 102
    assert fid.load_statistics(other)[2]["images"] == 100 and fid.load_statistics(cache)[2]["images"] == 1497


def test_fid_with_an_official_statistics_file(stand_in, tmp_path):
    library, features, _ = stand_in
    rng = np.random.default_rng(0)
    mu = np.zeros(2048)
    mu[:4] = rng.standard_normal(4)
    sigma = np.zeros((2048, 2048))
    sigma[:16, :16] = np.eye(16)
    np.savez(tmp_path / "digits.npz", mu=mu, sigma=sigma)  # what precompute_fid_statistics.py writes
    result = _fid(tiny_digits_model(), features, library, tmp_path, reference_file=tmp_path / "digits.npz")
    np.testing.assert_array_equal(fid_fixtures.distances[-1][0], mu)
    assert result.reference == str(tmp_path / "digits.npz") and result.reference_images is None
    np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=sigma)
    with pytest.raises(InputError, match=r"mu \(2048,\)"):
        _fid(tiny_digits_model(), features, library, tmp_path, reference_file=tmp_path / "bad.npz")


def test_fid_errors(stand_in, tmp_path, monkeypatch):
    library, features, _ = stand_in
    model = tiny_digits_model()
    with pytest.raises(InputError, match="at least 2 samples"):
        _fid(model, features, library, tmp_path, num_samples=1)

    sample = model.sample

    def with_nan(n, t):
        logits = sample(n, t)
        logits[0] = float("nan")
        return logits

    model.sample = with_nan
    with pytest.raises(NonFiniteSamples, match=r"1 of 50 samples at t=1 have NaN/Inf.*FID needs finite images"):
        _fid(model, features, library, tmp_path)

    # The weights: a tampered cached file, a download that fails.
    cached = features.weights
    cached.write_bytes(b"tampered")
    with pytest.raises(InputError, match="not the FID Inception weights.*delete it"):
        fid.InceptionFeatures("cpu", library)
    cached.unlink()

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InputError, match=f"cannot download the FID Inception weights.*put {fid_fixtures.WEIGHTS_NAME} "
                                         "into"):
        fid.InceptionFeatures("cpu", library)

    # Without the extra.
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(InputError, match=r"FID needs pytorch-fid: pip install 'nvae_fast\[fid\]'"):
        fid.load_library()


def _real_library():
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid (the [fid] extra) is not installed")
    try:
        return fid.load_library()
    except InputError as e:
        pytest.skip(f"pytorch-fid does not import here: {e}")


def test_real_library_network_with_random_weights(monkeypatch, tmp_path):
    library = _real_library()
    import pytorch_fid.inception as inception

    # The published weights may be absent: the network keeps its random initialisation.
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, *a, **k: None)
    monkeypatch.setattr(fid, "inception_weights", lambda url: tmp_path / url.rsplit("/", 1)[-1])
    features = fid.InceptionFeatures("cpu", library)
    monkeypatch.undo()
    torch.manual_seed(0)
    images = torch.rand(3, 1, 8, 8)
    out = features(images)
    assert out.shape == (3, 2048) and torch.isfinite(out).all()
    with torch.no_grad():
        direct = features.net(images.expand(-1, 3, -1, -1))[0].flatten(1)
    torch.testing.assert_close(out, direct)
    stats = fid.FeatureStats()
    stats.update(out)
    value = fid.frechet_distance(library, stats.result(), stats.result())
    assert abs(value) < 1e-3


def test_real_fid_with_the_published_weights(tmp_path):
    library = _real_library()
    weights = Path(torch.hub.get_dir()) / "checkpoints" / REAL_WEIGHTS
    if not weights.is_file():
        pytest.skip(f"the FID Inception weights are not in {weights.parent} (tests never download them)")
    assert hashlib.sha256(weights.read_bytes()).hexdigest().startswith("6726825d")
    features = fid.InceptionFeatures("cpu", library)
    model = tiny_digits_model()
    torch.manual_seed(4)
    result = _fid(model, features, library, tmp_path, num_samples=6, batch_size=3, num_reference=8)
    assert np.isfinite(result.fid) and result.fid > 0

    # pytorch-fid's own computation on the same images.
    train, test = _digits()
    items, _ = fid.reference_images(train, test, "digits", 8)
    reference = torch.stack([ds[(0, i)] for ds, i in items]).expand(-1, 3, -1, -1)
    torch.manual_seed(4)
    with torch.no_grad():
        samples = torch.cat([model.mean_image(model.sample(3, 1.0)) for _ in range(2)]).expand(-1, 3, -1, -1)
        acts = [features.net(x)[0].flatten(1).double().numpy() for x in (reference, samples)]
    expected = library.frechet_distance(acts[0].mean(0), np.cov(acts[0], rowvar=False), acts[1].mean(0),
                                        np.cov(acts[1], rowvar=False))
    assert result.fid == pytest.approx(expected, rel=1e-4)
