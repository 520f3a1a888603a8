"""visualize: patches laid out on Caffe2's grid, drawn with matplotlib (Agg)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib import pyplot  # noqa: E402

from caffe2torch.python import visualize  # noqa: E402


@pytest.fixture(autouse=True)
def figure():
    pyplot.figure()
    yield
    pyplot.close("all")


def shown_image():
    """The array and colormap of the last imshow on the current axes."""
    images = pyplot.gca().get_images()
    assert images, "nothing was drawn"
    return np.asarray(images[-1].get_array()), images[-1].get_cmap().name


def test_nchw_show_multiple_grid_layout():
    rng = np.random.default_rng(0)
    patches = rng.random((5, 1, 4, 3))  # N, C, H, W
    assert visualize.NCHW.ShowMultiple(patches) is None
    image, cmap = shown_image()
    # ncols = ceil(sqrt(5)) = 3, nrows = 2, gap 1: (2*5 - 1, 3*4 - 1).
    assert image.shape == (9, 11) and cmap == "gray"
    for p in range(5):
        row, col = (p // 3) * 5, (p % 3) * 4
        np.testing.assert_allclose(image[row:row + 4, col:col + 3], patches[p, 0])
    # Gaps and the empty sixth cell are filled with the mean of all patches.
    np.testing.assert_allclose(image[4, :], patches.mean())
    np.testing.assert_allclose(image[5:, 8:], patches.mean())
    assert not pyplot.gca().axison


def test_nchw_color_patches_become_rgb():
    patches = np.random.default_rng(1).random((2, 3, 5, 5))
    visualize.NCHW.ShowMultiple(patches)
    image, _ = shown_image()
    assert image.shape == (5, 11, 3)
    np.testing.assert_allclose(image[:, :5], patches[0].transpose(1, 2, 0))


def test_nhwc_show_multiple_and_bad_channel_count():
    patches = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3, 1)
    visualize.NHWC.ShowMultiple(patches)
    image, _ = shown_image()
    np.testing.assert_array_equal(image[:, 4:], patches[1, :, :, 0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        visualize.NCHW.ShowMultiple(np.zeros((2, 2, 4, 4)))


def test_patch_visualizer_returns_canvas_and_infers_square_patches():
    flat = np.arange(4 * 9, dtype=np.float64).reshape(4, 9)  # four flattened 3x3 patches
    image = visualize.PatchVisualizer(gap=2).ShowMultiple(flat, ncols=4)
    assert image.shape == (3, 4 * 3 + 3 * 2)
    np.testing.assert_array_equal(image[:, 5:8], flat[1].reshape(3, 3))
    with pytest.raises(ValueError, match="square patch"):
        visualize.PatchVisualizer().ShowMultiple(np.zeros((2, 7)))


def test_show_images_rescales_to_unit_range():
    image = visualize.PatchVisualizer().ShowImages(np.array([[[[10.0]]], [[[30.0]]]]))
    assert image.min() >= 0 and image.max() <= 1 and image[0, 0] == 0


def test_channel_helpers_are_inverse():
    arr = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert visualize.ChannelLast(arr).shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(visualize.ChannelFirst(visualize.ChannelLast(arr)), arr)


def test_uint8_mnist_batch_draws(tmp_path):
    batch = (np.random.default_rng(2).random((8, 1, 28, 28)) * 255).astype(np.uint8)
    visualize.NCHW.ShowMultiple(batch)
    out = tmp_path / "grid.png"
    pyplot.savefig(out)
    assert out.stat().st_size > 0
