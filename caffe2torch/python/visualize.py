"""Caffe2's ``visualize``: show many image patches (inputs, filters, feature maps) as one grid.

``NCHW.ShowMultiple(arr)`` takes a batch [N, C, H, W] (C = 1 or 3), ``NHWC.ShowMultiple`` a batch
[N, H, W, C]; both draw with matplotlib's pyplot on the current figure, so they work in Jupyter
and with the Agg backend alike::

    pyplot.figure()
    visualize.NCHW.ShowMultiple(workspace.FetchBlob("conv1")[0:1].swapaxes(0, 1))
"""
import numpy as np
from matplotlib import cm, pyplot


def ChannelFirst(arr):
    """HWC -> CHW (the last three axes)."""
    ndim = arr.ndim
    return arr.swapaxes(ndim - 1, ndim - 2).swapaxes(ndim - 2, ndim - 3)


def ChannelLast(arr):
    """CHW -> HWC (the last three axes)."""
    ndim = arr.ndim
    return arr.swapaxes(ndim - 3, ndim - 2).swapaxes(ndim - 2, ndim - 1)


class PatchVisualizer:
    """Draws patches on a grid with ``gap`` background pixels between them."""

    def __init__(self, gap=1):
        self.gap = gap

    def ShowSingle(self, patch, cmap=None):
        """Show one patch: a vector (square shape inferred), [H, W] or [H, W, 3]."""
        patch = np.asarray(patch)
        if patch.ndim == 1:
            patch = patch.reshape(self.get_patch_shape(patch))
        elif patch.ndim > 2 and patch.shape[2] != 3:
            raise ValueError(f"a single patch must be [H, W] or [H, W, 3], got shape {patch.shape}")
        if patch.ndim == 2 and cmap is None:
            cmap = cm.gray
        pyplot.imshow(patch, cmap=cmap)
        return patch

    def ShowMultiple(self, patches, ncols=None, cmap=None, bg_func=np.mean):
        """Show patches [N, H, W], [N, H, W, 1|3] or [N, H*W] on a grid; returns the canvas."""
        patches = np.asarray(patches)
        num_patches = patches.shape[0]
        if ncols is None:
            ncols = int(np.ceil(np.sqrt(num_patches)))
        nrows = int(np.ceil(num_patches / float(ncols)))
        if patches.ndim == 2:
            patches = patches.reshape((num_patches,) + self.get_patch_shape(patches[0]))
        patch_size_expand = np.array(patches.shape[1:3]) + self.gap
        image_size = patch_size_expand * np.array([nrows, ncols]) - self.gap
        if patches.ndim == 4:
            if patches.shape[3] == 1:
                patches = patches.reshape(patches.shape[:-1])
                image_shape = tuple(image_size)
                if cmap is None:
                    cmap = cm.gray
            elif patches.shape[3] == 3:
                image_shape = tuple(image_size) + (3,)
            else:
                raise ValueError(f"patches must have 1 or 3 channels, got shape {patches.shape}")
        else:
            image_shape = tuple(image_size)
            if cmap is None:
                cmap = cm.gray
        image = np.ones(image_shape) * bg_func(patches)
        for pid in range(num_patches):
            row = pid // ncols * patch_size_expand[0]
            col = pid % ncols * patch_size_expand[1]
            image[row:row + patches.shape[1], col:col + patches.shape[2]] = patches[pid]
        pyplot.imshow(image, cmap=cmap, interpolation="nearest")
        pyplot.axis("off")
        return image

    def ShowImages(self, patches, *args, **kwargs):
        """ShowMultiple with the values rescaled to [0, 1]."""
        patches = np.asarray(patches, dtype=np.float64)
        patches = patches - np.min(patches)
        patches /= np.max(patches) + np.finfo(np.float64).eps
        return self.ShowMultiple(patches, *args, **kwargs)

    def ShowChannels(self, patch, cmap=None, bg_func=np.mean):
        """Show each channel of one [H, W, C] patch as a gray patch."""
        patch = np.asarray(patch)
        if patch.ndim != 3:
            raise ValueError(f"ShowChannels needs one [H, W, C] patch, got shape {patch.shape}")
        return self.ShowMultiple(np.swapaxes(patch.T, 1, 2), cmap=cmap, bg_func=bg_func)

    def get_patch_shape(self, patch):
        """(n, n) or (n, n, 3) for a flattened square patch of ``patch.size`` values."""
        edge = np.sqrt(patch.size)
        if edge != np.floor(edge):
            edge = np.sqrt(patch.size / 3.0)
            if edge != np.floor(edge):
                raise ValueError(f"cannot infer a square patch shape from {patch.size} values; "
                                 "pass patches as [N, H, W] or [N, H, W, C]")
            return (int(edge), int(edge), 3)
        return (int(edge), int(edge))


_default_visualizer = PatchVisualizer()


class NHWC:
    """Patches in [N, H, W, C] layout; the functions draw and return None."""

    @staticmethod
    def ShowSingle(*args, **kwargs):
        """PatchVisualizer.ShowSingle."""
        _default_visualizer.ShowSingle(*args, **kwargs)

    @staticmethod
    def ShowMultiple(*args, **kwargs):
        """PatchVisualizer.ShowMultiple."""
        _default_visualizer.ShowMultiple(*args, **kwargs)

    @staticmethod
    def ShowImages(*args, **kwargs):
        """PatchVisualizer.ShowImages."""
        _default_visualizer.ShowImages(*args, **kwargs)

    @staticmethod
    def ShowChannels(*args, **kwargs):
        """PatchVisualizer.ShowChannels."""
        _default_visualizer.ShowChannels(*args, **kwargs)


class NCHW:
    """Patches in [N, C, H, W] layout (Caffe2's default); converted to HWC, then drawn."""

    @staticmethod
    def ShowSingle(patch, *args, **kwargs):
        """PatchVisualizer.ShowSingle of a [C, H, W] patch."""
        _default_visualizer.ShowSingle(ChannelLast(np.asarray(patch)), *args, **kwargs)

    @staticmethod
    def ShowMultiple(patch, *args, **kwargs):
        """PatchVisualizer.ShowMultiple of [N, C, H, W] patches."""
        _default_visualizer.ShowMultiple(ChannelLast(np.asarray(patch)), *args, **kwargs)

    @staticmethod
    def ShowImages(patch, *args, **kwargs):
        """PatchVisualizer.ShowImages of [N, C, H, W] patches."""
        _default_visualizer.ShowImages(ChannelLast(np.asarray(patch)), *args, **kwargs)

    @staticmethod
    def ShowChannels(patch, *args, **kwargs):
        """PatchVisualizer.ShowChannels of one [C, H, W] patch."""
        _default_visualizer.ShowChannels(ChannelLast(np.asarray(patch)), *args, **kwargs)
