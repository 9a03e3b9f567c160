"""What the trainer's condition inputs are, for each kind of adapter it trains.

The four official configurations take four kinds of condition, and the trainer reads each from the
data folder:

* 1 channel (sketch, edges: ``bps_sd15_pidinet.yaml``): ``source/NAME.png`` as luminance;
* 3 channels (layout, segmentation: ``bps_sd15_layout.yaml``): ``source/NAME.png`` as RGB;
* style (``bps_sd15_style.yaml``, BPS_forstyle): ``source/NAME.png`` as RGB plus an extra map
  ``extra/NAME.png`` read as luminance, the same size as the source;
* 24 channels (``bps_sd15_style2.yaml``): ``source/NAME.npy``, a float array of 24 channels at
  latent resolution (1/8 of the target's width and height), ``(24, h, w)`` or ``(h, w, 24)``.

No torch, no ComfyUI: the data checks run before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Channels of a latent-resolution map (the official style2 configuration).
LATENT_MAP_CHANNELS = 24
#: File ending of a latent-resolution map.
MAP_SUFFIX = ".npy"
#: Folder of the style adapters' extra maps, beside source/ and target/.
EXTRA_FOLDER = "extra"
#: The VAE's factor: a latent-resolution map is 1/8 of the target's size.
LATENT_FACTOR = 8


@dataclass(frozen=True)
class HintLayout:
    """The condition input of one kind of adapter.

    Attributes:
        channels: channels of the condition: 1, 3 or 24 (a map at latent resolution).
        extra_map: a style adapter: an RGB condition plus a 1-channel extra map from ``extra/``.
    """

    channels: int = 1
    extra_map: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3, LATENT_MAP_CHANNELS):
            raise ValueError(f"hint channels must be 1, 3 or {LATENT_MAP_CHANNELS}, got {self.channels}")
        if self.extra_map and self.channels != 3:
            raise ValueError(f"an extra map goes with a 3-channel (RGB) condition, not {self.channels} channels")

    @property
    def latent_map(self) -> bool:
        """True when the condition is a ``.npy`` map at latent resolution, not an image."""
        return self.channels == LATENT_MAP_CHANNELS

    @property
    def name(self) -> str:
        """Short name for logs and cache keys: "1ch", "3ch", "style" or "map24"."""
        return "style" if self.extra_map else f"map{self.channels}" if self.latent_map else f"{self.channels}ch"

    @property
    def default_meaning(self) -> str:
        """Hint meaning stored in the adapter unless --hint-meaning says otherwise."""
        return {"1ch": "sketch", "3ch": "image", "style": "style", "map24": "style2"}[self.name]

    def network_fields(self) -> dict[str, int]:
        """The ``BPSConfig`` fields of this condition (hint_channels, extra_channels, downscale)."""
        return {"hint_channels": self.channels, "extra_channels": 1 if self.extra_map else 0,
                "downscale": 1 if self.latent_map else LATENT_FACTOR}

    def describe(self) -> str:
        """Where the condition comes from, in words (for messages)."""
        if self.latent_map:
            return (f"source/NAME{MAP_SUFFIX}: a {self.channels}-channel float array at latent resolution "
                    f"(1/{LATENT_FACTOR} of the target's size), shaped ({self.channels}, h, w) or (h, w, "
                    f"{self.channels})")
        text = "source/NAME.png as " + ("luminance" if self.channels == 1 else "RGB")
        if self.extra_map:
            text += f", plus {EXTRA_FOLDER}/NAME.png (same size, read as luminance)"
        return text


def hint_layout_of(args) -> HintLayout:
    """The condition layout the trainer's command line asks for (--hint-channels, --extra-map)."""
    return HintLayout(args.hint_channels, bool(getattr(args, "extra_map", False)))
