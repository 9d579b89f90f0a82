"""The v3 colour tables of the reference world-scenario renderer and the type -> colour-class mappings.

Spec: `docs/control_videos.md` §3.4 (map elements), §3.5 (laneline styles), §3.8 (box gradients, type
simplification), traffic lights "v2" (§3.4). Values are the reference's `color_scheme/*.json` (v3 / v2 keys).
`compat="reference"` reproduces the reference's quirks (trucks and buses in the Others colour, unknown laneline
styles in the olive OTHER style); `compat="fixed"` applies the documented fixes (§7).
"""

from __future__ import annotations

import dataclasses

COMPAT_MODES = ("reference", "fixed")

# §3.4: static map elements (config_color_hdmap.json "v3"). Lanelines take per-type colours (LANELINE_STYLES).
MAP_COLORS: dict[str, tuple[int, int, int]] = {
    "road_boundaries": (253, 1, 232),
    "wait_lines": (108, 179, 59),
    "poles": (183, 69, 177),
    "crosswalks": (139, 93, 255),
    "road_markings": (20, 254, 185),
    "traffic_signs": (8, 2, 255),
}

# §3.4: line widths in pixels (at the 1280-wide viewport) and the subdivision step (m) of each polyline element.
LINE_WIDTHS: dict[str, float] = {"road_boundaries": 12.0, "wait_lines": 12.0, "poles": 5.0, "lanelines": 12.0}
SUBDIVIDE_STEP_M: dict[str, float] = {"road_boundaries": 0.8, "wait_lines": 0.8, "poles": 0.8, "polygons": 0.8,
                                      "lanelines": 0.05}

# §3.4 traffic lights (config_color_traffic_light.json "v2"), by lower-case state.
TRAFFIC_LIGHT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (240, 50, 50),
    "yellow": (255, 200, 0),
    "green": (130, 240, 132),
    "unknown": (100, 100, 100),
}
TRAFFIC_LIGHT_STATES = ("red", "yellow", "green", "unknown", "off")

# §3.8: dynamic boxes, v3 gradient (front corners 0,1,4,5 get the first colour, back corners 2,3,6,7 the second).
BOX_GRADIENTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "Car": ((0, 46, 136), (126, 206, 255)),
    "Truck": ((204, 55, 0), (255, 192, 64)),
    "Pedestrian": ((148, 0, 62), (255, 124, 171)),
    "Cyclist": ((0, 80, 66), (102, 208, 198)),
    "Others": ((53, 26, 20), (166, 136, 125)),
}
BOX_EDGE_COLOR = (200, 200, 200)
BOX_EDGE_WIDTH = 4.0


@dataclasses.dataclass(frozen=True)
class LanelineStyle:
    """How one `"<COLOR> <STYLE>"` laneline type is drawn (§3.5): colour, pattern(s), width multiplier."""

    color: tuple[int, int, int]
    pattern: str  # solid | long_dashed | short_dashed | dot_dashed | dotted_1_9 | dual
    thickness: float = 1.0
    dual: tuple[str, str] | None = None  # (pattern on the +offset copy, pattern on the -offset copy)


_W, _Y, _O = (255, 255, 255), (255, 255, 0), (181, 164, 71)

# §3.5: config_color_geometry_laneline.json. Any other key falls back to "OTHER" (olive, solid, x1).
LANELINE_STYLES: dict[str, LanelineStyle] = {
    "WHITE SOLID_SINGLE": LanelineStyle(_W, "solid"),
    "WHITE LONG_DASHED_SINGLE": LanelineStyle(_W, "long_dashed"),
    "WHITE SHORT_DASHED_SINGLE": LanelineStyle(_W, "short_dashed"),
    "WHITE DOT_DASHED_SINGLE": LanelineStyle(_W, "dot_dashed"),
    "WHITE OTHER": LanelineStyle(_W, "solid", 3.0),
    "WHITE SOLID_GROUP": LanelineStyle(_W, "dual", dual=("solid", "solid")),
    "YELLOW DOT_SOLID_SINGLE": LanelineStyle(_Y, "dotted_1_9"),
    "YELLOW DOT_SOLID_GROUP": LanelineStyle(_Y, "dual", dual=("dotted_1_9", "dotted_1_9")),
    "YELLOW DASHED_SOLID": LanelineStyle(_Y, "dual", dual=("solid", "long_dashed")),
    "YELLOW SOLID_DASHED": LanelineStyle(_Y, "dual", dual=("long_dashed", "solid")),
    "YELLOW SOLID_SINGLE": LanelineStyle(_Y, "solid"),
    "YELLOW SOLID_GROUP": LanelineStyle(_Y, "dual", dual=("solid", "solid")),
    "YELLOW LONG_DASHED_SINGLE": LanelineStyle(_Y, "long_dashed"),
    "YELLOW OTHER": LanelineStyle(_Y, "solid", 3.0),
    "OTHER": LanelineStyle(_O, "solid"),
}

# §7 fixes: the styles the reference has no entry for get the pattern their name says (white or yellow);
# other colours (BLUE, UNKNOWN) and UNKNOWN styles still fall back to OTHER.
_FIXED_STYLE_PATTERNS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "SOLID_SINGLE": ("solid", None),
    "DASHED_SINGLE": ("short_dashed", None),
    "LONG_DASHED_SINGLE": ("long_dashed", None),
    "SHORT_DASHED_SINGLE": ("short_dashed", None),
    "DOT_DASHED_SINGLE": ("dot_dashed", None),
    "DOT_SOLID_SINGLE": ("dotted_1_9", None),
    "SOLID_DOUBLE": ("dual", ("solid", "solid")),
    "SOLID_GROUP": ("dual", ("solid", "solid")),
    "DASHED_DOUBLE": ("dual", ("long_dashed", "long_dashed")),
    "LONG_DASHED_GROUP": ("dual", ("long_dashed", "long_dashed")),
    "DOT_DASHED_GROUP": ("dual", ("dot_dashed", "dot_dashed")),
    "DOT_SOLID_GROUP": ("dual", ("dotted_1_9", "dotted_1_9")),
    "SOLID_DASHED": ("dual", ("long_dashed", "solid")),
    "DASHED_SOLID": ("dual", ("solid", "long_dashed")),
}

# data_types.LaneLineColor / LaneLineStyle enums: anything else becomes UNKNOWN at load time (§3.5).
LANELINE_COLOR_ENUM = ("WHITE", "YELLOW", "BLUE", "UNKNOWN")
LANELINE_STYLE_ENUM = ("SOLID_SINGLE", "DASHED_SINGLE", "SOLID_DOUBLE", "DASHED_DOUBLE", "SOLID_DASHED",
                       "DASHED_SOLID", "LONG_DASHED_SINGLE", "LONG_DASHED_GROUP", "SHORT_DASHED_SINGLE",
                       "DOT_DASHED_SINGLE", "DOT_DASHED_GROUP", "SOLID_GROUP", "DOT_SOLID_SINGLE", "DOT_SOLID_GROUP",
                       "UNKNOWN")


def laneline_style(color: str, style: str, compat: str = "reference") -> LanelineStyle:
    """Style of a laneline of enum colour/style (§3.5); unknown keys -> OTHER (reference) or the named pattern."""
    key = f"{color} {style}"
    if key in LANELINE_STYLES:
        return LANELINE_STYLES[key]
    if compat == "fixed" and color in ("WHITE", "YELLOW") and style in _FIXED_STYLE_PATTERNS:
        pattern, dual = _FIXED_STYLE_PATTERNS[style]
        return LanelineStyle(_W if color == "WHITE" else _Y, pattern, 1.0, dual)
    return LANELINE_STYLES["OTHER"]


# RDS-HQ loader: raw `object_type` -> ObjectType value (rdshq_loader._map_object_type); unknown -> "Other".
_RDSHQ_OBJECT_TYPES: dict[str, str] = {
    "Automobile": "Car", "Other_vehicle": "Car", "Vehicle": "Car", "Car": "Car",
    "Pedestrian": "Pedestrian", "Person": "Pedestrian",
    "Bicycle": "Cyclist", "Cyclist": "Cyclist", "Motorcycle": "Cyclist", "Rider": "Cyclist",
    "Bus": "Truck", "Truck": "Truck", "Heavy_truck": "Truck", "Train_or_tram_car": "Truck",
    "Trolley_bus": "Truck", "Trailer": "Truck",
}

# renderer._simplify_object_type lists (§3.8)
_TRUCK_NAMES = ("Bus", "Heavy_Truck", "Train_Or_Tram_Car", "Trolley_Bus", "Trailer")
_CAR_NAMES = ("Vehicle", "Automobile", "Other_Vehicle", "Car")
_PED_NAMES = ("Person", "Pedestrian")
_CYCLIST_NAMES = ("Rider", "Cyclist", "Motorcycle", "Bicycle")


def _simplify(name: str) -> str:
    norm = name.replace("_", " ").replace("-", " ").title().replace(" ", "_")
    if norm in _TRUCK_NAMES:
        return "Truck"
    if norm in _CAR_NAMES:
        return "Car"
    if norm in _PED_NAMES:
        return "Pedestrian"
    if norm in _CYCLIST_NAMES:
        return "Cyclist"
    return "Others"


def box_class(raw_type: str, compat: str = "reference") -> str:
    """Colour class of a dynamic object from its raw RDS-HQ `object_type` (§3.8).

    reference: the loader maps the raw type to an ObjectType value first, and the renderer's truck list does not
    contain that value ("Truck"), so trucks and buses end up "Others". fixed: "Truck" is a truck.
    """
    loaded = _RDSHQ_OBJECT_TYPES.get(str(raw_type), "Other")
    if compat == "fixed" and loaded == "Truck":
        return "Truck"
    return _simplify(loaded)
