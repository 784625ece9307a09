"""vae_enable_slicing / vae_enable_tiling: the VAE's own memory savers, used while latents are cached."""

from __future__ import annotations

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

# option -> the VAE method it calls
_SWITCHES = {"vae_enable_slicing": "enable_slicing", "vae_enable_tiling": "enable_tiling"}


def configure_vae(family, components, settings: Settings, device) -> None:
    """Setup step: slicing encodes a batch one image at a time; tiling encodes large images in overlapping tiles."""
    for option, method in _SWITCHES.items():
        if not getattr(settings, option):
            continue
        vae = components.vae
        if vae is None or not hasattr(vae, method):
            feature = method.replace("enable_", "")
            raise ConfigError(option, f"{option}: model_family={family.name}'s VAE ({type(vae).__name__}) has no "
                                      f"{feature}. Remove {option}.")
        getattr(vae, method)()
