"""The optimizer settings that are not hyper-parameters of a step: the Variance Gradient
Scaler's settings (:class:`VGSConfig`) and the noise seed, validated by the core."""

from __future__ import annotations

from collections.abc import Mapping


from upgd_ref.hyperparams import validate_vgs


class VGSConfig(Mapping):
    """Settings of the Variance Gradient Scaler, validated by the core.

    Keras has no separate gradient-scaler hook, so the scaler is configured on the
    optimizer: ``AdaptiveUPGD(vgs=VGSConfig(warmup_steps=10))`` or ``vgs={"warmup_steps":
    10}``. Keys and defaults: ``upgd_ref.hyperparams.VGS_DEFAULTS`` (``enabled, beta,
    alpha, eps, warmup_steps, min_scaling_factor, variance_cap``).
    """

    def __init__(self, **settings):
        self._settings = validate_vgs(settings, where="vgs: ")

    def __getitem__(self, key):
        return self._settings[key]

    def __iter__(self):
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return "VGSConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._settings.items()) + ")"


def validated_vgs(vgs):
    """``None`` (no scaler) or a validated dict of every VGS hyper-parameter."""
    if vgs is None or vgs is False:
        return None
    if vgs is True:
        return validate_vgs({}, where="vgs: ")
    if isinstance(vgs, Mapping):
        return validate_vgs(dict(vgs), where="vgs: ")
    raise TypeError(
        f"vgs must be None, True, a dict or a VGSConfig of VGS settings, got {type(vgs).__name__}"
    )


