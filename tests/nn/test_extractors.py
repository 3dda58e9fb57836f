"""Observation features: flattening and one-hot (torch and numpy), the Nature CNN, Dict observations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.nn.extractors import CombinedExtractor, FlattenExtractor, NatureCNN, is_image_space, make_extractor


def test_box_observations_are_flattened_to_float32() -> None:
    extractor = make_extractor(gym.spaces.Box(-1, 1, (2, 3), np.float64))
    assert extractor.features_dim == 6 and not extractor.one_hot
    obs = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    features = extractor(torch.from_numpy(obs))
    assert features.shape == (2, 6) and features.dtype == torch.float32
    np.testing.assert_array_equal(extractor.forward_numpy(obs), features.numpy())


def test_discrete_observations_are_one_hot() -> None:
    extractor = make_extractor(gym.spaces.Discrete(5))
    assert extractor.features_dim == 5 and extractor.one_hot
    torch.testing.assert_close(extractor(torch.tensor([0, 4])), torch.eye(5)[[0, 4]])
    np.testing.assert_array_equal(extractor.forward_numpy(np.array([0, 4])), np.eye(5, dtype=np.float32)[[0, 4]])


def test_float32_box_features_are_a_view_in_numpy() -> None:
    obs = np.zeros((3, 4), np.float32)
    assert np.shares_memory(FlattenExtractor(gym.spaces.Box(-1, 1, (4,), np.float32)).forward_numpy(obs), obs)


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Dict({"a": gym.spaces.Dict({"b": gym.spaces.Discrete(2)})}),
        gym.spaces.MultiBinary(2),
        gym.spaces.Discrete(3, start=1),
    ],
)
def test_unsupported_observation_spaces_raise(space: gym.Space) -> None:
    with pytest.raises(ValueError, match="Unsupported observation space"):
        make_extractor(space)


def test_the_extractor_adds_nothing_to_the_state_dict() -> None:
    assert FlattenExtractor(gym.spaces.Box(-1, 1, (4,))).state_dict() == {}


# ---------------------------------------------------------------------- images and Dict observations

IMAGE_HWC = gym.spaces.Box(0, 255, (36, 40, 3), np.uint8)
IMAGE_CHW = gym.spaces.Box(0, 255, (3, 36, 40), np.uint8)


@pytest.mark.parametrize(
    ("space", "normalize", "expected"),
    [
        (IMAGE_HWC, True, True),
        (IMAGE_CHW, True, True),
        (gym.spaces.Box(0, 255, (36, 3, 40), np.uint8), True, False),  # channels in the middle
        (gym.spaces.Box(0, 1, (36, 40, 3), np.float32), True, False),  # float: not an image
        (gym.spaces.Box(0, 100, (36, 40, 3), np.uint8), True, False),  # bounds not [0, 255]
        (gym.spaces.Box(0, 100, (36, 40, 3), np.uint8), False, True),
        (gym.spaces.Box(0, 255, (36, 40), np.uint8), True, False),  # 2-D
    ],
)
def test_is_image_space_follows_sb3(space: gym.spaces.Box, normalize: bool, expected: bool) -> None:
    assert is_image_space(space, normalize) is expected


def test_auto_picks_the_extractor_from_the_space() -> None:
    assert isinstance(make_extractor(IMAGE_HWC), NatureCNN)
    assert isinstance(make_extractor(gym.spaces.Box(0, 1, (36, 40, 3), np.float32)), FlattenExtractor)
    assert isinstance(make_extractor(gym.spaces.Dict({"image": IMAGE_CHW, "x": gym.spaces.Discrete(3)})), CombinedExtractor)
    assert isinstance(make_extractor(IMAGE_HWC, "mlp"), FlattenExtractor)


def test_nature_cnn_scales_uint8_inside_and_handles_channel_order() -> None:
    torch.manual_seed(0)
    hwc = NatureCNN(IMAGE_HWC, features_dim=16)
    chw = NatureCNN(IMAGE_CHW, features_dim=16)
    chw.load_state_dict(hwc.state_dict())
    frames = torch.randint(0, 256, (5, 36, 40, 3), dtype=torch.uint8)
    features = hwc(frames)
    assert features.shape == (5, 16) and features.dtype == torch.float32
    torch.testing.assert_close(chw(frames.permute(0, 3, 1, 2)), features)
    unscaled = NatureCNN(IMAGE_HWC, features_dim=16, normalize_images=False)
    unscaled.load_state_dict(hwc.state_dict())
    torch.testing.assert_close(unscaled(frames.float() / 255.0), features)
    expected = hwc.linear(hwc.cnn(frames.permute(0, 3, 1, 2).float() / 255.0))
    torch.testing.assert_close(features, expected)


def test_nature_cnn_is_the_papers_network() -> None:
    cnn = NatureCNN(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8))
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))
    ]
    assert cnn.linear[0].in_features == 64 * 7 * 7 and cnn.features_dim == 512


def test_combined_extractor_concatenates_per_key_features_in_key_order() -> None:
    space = gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2,), np.float32), "image": IMAGE_CHW, "k": gym.spaces.Discrete(3)})
    extractor = CombinedExtractor(space, cnn_output_dim=8)
    assert extractor.keys == ["image", "k", "pos"] and extractor.features_dim == 8 + 3 + 2
    obs = {key: torch.as_tensor(np.stack([sub.sample() for _ in range(4)])) for key, sub in space.spaces.items()}
    features = extractor(obs)
    image = extractor.extractors["image"](obs["image"])
    expected = torch.cat([image, torch.eye(3)[obs["k"]], obs["pos"]], dim=1)
    torch.testing.assert_close(features, expected)


class TinyExtractor(torch.nn.Module):
    def __init__(self, observation_space: gym.Space, width: int = 4) -> None:
        super().__init__()
        self.features_dim = width
        self.linear = torch.nn.Linear(int(np.prod(observation_space.shape)), width)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs.float().flatten(1))


def test_an_extractor_class_with_kwargs() -> None:
    extractor = make_extractor(IMAGE_HWC, TinyExtractor, {"width": 6})
    assert isinstance(extractor, TinyExtractor) and extractor.features_dim == 6


@pytest.mark.parametrize(
    ("space", "extractor", "match"),
    [
        (gym.spaces.Box(0, 1, (36, 40, 3), np.float32), "nature_cnn",
         r"Unsupported observation space Box\(0.0, 1.0, \(36, 40, 3\), float32\) for nature_cnn with "
         r"normalize_images=True: expected dtype uint8 with bounds \[0, 255\]"),
        (gym.spaces.Box(0, 255, (8, 8, 1), np.uint8), "nature_cnn",
         r"images of 8 x 8 pixels; the network needs at least 36 x 36"),
        (gym.spaces.Box(-1, 1, (3,), np.float32), "nature_cnn", r"for nature_cnn; expected a 3-D image Box"),
        (gym.spaces.Dict({"a": gym.spaces.Tuple((gym.spaces.Discrete(2),))}), "auto",
         r"Unsupported observation space Tuple\(Discrete\(2\)\) at key 'a'; supported: Box and Discrete"),
        (gym.spaces.Dict({"a": gym.spaces.Dict({"b": gym.spaces.Discrete(2)})}), "auto",
         r"at key 'a': a nested Dict; supported: Box and Discrete"),
        (gym.spaces.Dict({"t": gym.spaces.Text(4)}), "auto", r"Unsupported observation space Text\(1, 4.* at key 't'"),
        (gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None), "auto", r"Unsupported observation space Graph\("),
        (IMAGE_HWC, "resnet",
         r"Invalid policy_kwargs.features_extractor: 'resnet'; expected one of \['auto', 'mlp', 'nature_cnn'\]"),
    ],
)
def test_bad_spaces_and_extractors_are_named(space: gym.Space, extractor: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_extractor(space, extractor)


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_without_its_instructions_warns_once(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN emulates bfloat16 on a CPU without AVX512-BF16 or AMX, many times slower than
    float32: the first forward on such a CPU says so, once; with the instructions, or in
    float32, nothing is said."""
    import warnings

    from trpo_lab.nn import extractors

    monkeypatch.setattr(extractors, "cpu_has_native_bfloat16", lambda: native)
    frames = torch.randint(0, 256, (2, 36, 40, 3), dtype=torch.uint8)
    fast, exact = NatureCNN(IMAGE_HWC, features_dim=8, compute_dtype="bfloat16"), NatureCNN(IMAGE_HWC, features_dim=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(frames), fast(frames), exact(frames)
    messages = [str(w.message) for w in caught if "bfloat16 instructions" in str(w.message)]
    if native:
        assert messages == []
    else:
        assert len(messages) == 1
        assert "compute_dtype='bfloat16' on a CPU without bfloat16 instructions" in messages[0]
        assert "use 'float32' here" in messages[0]


def test_the_cpu_bfloat16_query_is_onednns_answer() -> None:
    from trpo_lab.nn.extractors import cpu_has_native_bfloat16

    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    expected = True if query is None else bool(query())
    assert cpu_has_native_bfloat16() is expected


def test_a_bfloat16_nature_cnn_computes_in_bfloat16_and_returns_float32_features() -> None:
    """The convolutions run under autocast in bfloat16; the weights, their gradients and the
    features stay float32 and agree with the float32 network's to bfloat16's rounding."""
    torch.manual_seed(0)
    exact = NatureCNN(IMAGE_HWC, features_dim=16)
    fast = NatureCNN(IMAGE_HWC, features_dim=16, compute_dtype="bfloat16")
    fast.load_state_dict(exact.state_dict())
    frames = torch.randint(0, 256, (32, 36, 40, 3), dtype=torch.uint8)
    inside: list[torch.dtype] = []
    fast.cnn[0].register_forward_hook(lambda module, inputs, output: inside.append(output.dtype))
    features, reference = fast(frames), exact(frames)
    assert inside == [torch.bfloat16] and features.dtype == torch.float32
    error = (features - reference).norm() / reference.norm()
    assert 0 < error < 0.02
    features.square().sum().backward()
    reference.square().sum().backward()
    for p, q in zip(fast.parameters(), exact.parameters(), strict=True):
        assert p.dtype == p.grad.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("float16", r"compute_dtype: 'float16'; expected one of \['float32', 'bfloat16'\] \(float16 would need loss scaling"),
        ("bf16", r"compute_dtype: 'bf16'; expected one of \['float32', 'bfloat16'\]$"),
        (torch.bfloat16, r"compute_dtype: torch.bfloat16; expected one of"),
    ],
)
def test_bad_compute_dtypes_are_named(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_extractor(IMAGE_HWC, "nature_cnn", {"compute_dtype": value})
    # a Dict space checks it even when no key is an image
    with pytest.raises(ValueError, match=match):
        make_extractor(gym.spaces.Dict({"x": gym.spaces.Discrete(3)}), "auto", {"compute_dtype": value})
