"""Helpers over a napari viewer: find cleihc layers by role, replace a slide's layers (no widgets)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from napari_cleihc._layers import META_KEY, LayerDataTuple

__all__ = [
    "RESULT_ROLES",
    "add_layer_tuples",
    "cleihc_meta",
    "current_load_id",
    "current_results",
    "find_layer",
    "layers_with_role",
    "remove_layers",
    "viewer_camera",
]

#: Roles of the layers that show a slide's results (replaced when a slide is re-run or re-opened).
RESULT_ROLES = (
    "positive",
    "tissue",
    "regions",
    "run exclusions",
    "exclusions",
    "cells",
    "exclusion paint",
    "preview",
)


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 (``viewer.camera`` is deprecated there),
    ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def cleihc_meta(layer: Any) -> dict[str, Any]:
    """``layer.metadata["cleihc"]`` or an empty dict."""
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, dict) else {}


def layers_with_role(viewer: Any, role: str) -> list[Any]:
    """The viewer's layers of a role, top first."""
    return [layer for layer in reversed(viewer.layers) if cleihc_meta(layer).get("role") == role]


def find_layer(viewer: Any, role: str, *, slide: str | None = None) -> Any | None:
    """The selected layer when it has `role`, else the top one (of `slide` if given), else None."""
    active = viewer.layers.selection.active
    candidates = layers_with_role(viewer, role)
    if slide is not None:
        candidates = [c for c in candidates if cleihc_meta(c).get("slide") == slide]
    if active is not None and active in candidates:
        return active
    return candidates[0] if candidates else None


def current_results(viewer: Any) -> tuple[str, str] | None:
    """``(results folder, slide)`` of the top layers that came from a results folder, else None."""
    for layer in reversed(viewer.layers):
        meta = cleihc_meta(layer)
        if meta.get("out_dir") and meta.get("role") in RESULT_ROLES:
            return str(meta["out_dir"]), str(meta["slide"])
    return None


def current_load_id(viewer: Any) -> str | None:
    """The load token of the top layers that came from a results folder (new each time they are loaded)."""
    for layer in reversed(viewer.layers):
        meta = cleihc_meta(layer)
        if meta.get("out_dir") and meta.get("role") in RESULT_ROLES:
            return meta.get("load_id")
    return None


def remove_layers(viewer: Any, roles: Iterable[str], *, slide: str | None = None) -> None:
    """Remove the cleihc layers with these roles (of one slide, or all)."""
    roles = set(roles)
    for layer in list(viewer.layers):
        meta = cleihc_meta(layer)
        if meta.get("role") in roles and (slide is None or meta.get("slide") == slide):
            viewer.layers.remove(layer)


def add_layer_tuples(viewer: Any, tuples: Iterable[LayerDataTuple]) -> list[Any]:
    """Add ``(data, kwargs, kind)`` tuples in order (the first ends up lowest); returns the layers."""
    out = []
    for data, kwargs, kind in tuples:
        out.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return out
