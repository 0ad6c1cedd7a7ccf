"""Layout nodes: entities from a painted colour layout, or from boxes written as text."""

import logging

from comfy_api.latest import io

from ..core import conditioning as entity_conds
from ..core import layouts

CATEGORY = "EliGen/entities"
Entities = io.Custom("ELIGEN_ENTITIES")


def _text_length_input():
    return io.Combo.Input("text_length", options=list(entity_conds.TEXT_LENGTHS), default="padded_512",
                          tooltip="FLUX T5 length of the entity prompts: padded_512 = what the released EliGen "
                          "adapter saw; real_length = no padding. Qwen-Image prompts are never padded.")


def _previous_input():
    return Entities.Input("previous", optional=True,
                          tooltip="Entities defined before these (kept first; at most 16 in all).")


class EliGenPaintedLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenPaintedLayout",
            display_name="EliGen Painted Layout",
            category=CATEGORY,
            description="Entities from an image painted with one flat colour per entity on a background colour. "
            "Soft (anti-aliased) edges, JPEG noise, stray pixels, strokes under 3 px wide and patches smaller "
            "than min_area_percent are specks: they take the colour around them and never change a mask or "
            "the pairing. Prompts pair with colours by a legend (every line starts with its colour: "
            "'red: ...' or '#ff0000: ...') or, without one, in reading order: each colour stands at the centre "
            "of its largest region; the topmost centre starts a row with every colour whose centre lies "
            "between that region's top and bottom edges, read left to right; then the next row. When moving "
            f"a region by {100 * layouts.ORDER_TOLERANCE:g}% of the image would change that order (a near "
            "tie, a centre near a row's edge, one colour painted twice at one size), the node asks for a "
            "legend instead of guessing.",
            inputs=[
                io.Image.Input("layout", tooltip="The painted layout: one flat colour per entity on a background "
                               "colour, at the aspect ratio of the image to generate (RGB; no transparency)."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used for every entity prompt."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One entity prompt per line. Either a legend, every line starting with "
                                "its colour: 'red: a red apple' or '#ff0000: a red apple' (names: "
                                f"{', '.join(layouts.COLOUR_NAMES)}), or no colours at all: then the prompts "
                                "pair with the colours in reading order (see the node's description). The "
                                "'colours' output shows the pairing as a legend."),
                io.String.Input("background", default="largest",
                                tooltip="The colour that is no entity: 'largest' = the colour covering the most "
                                "pixels, '#rrggbb' = that colour, 'none' = every colour is an entity."),
                io.Float.Input("min_area_percent", default=0.5, min=0.01, max=40.0, step=0.01,
                               tooltip="The smallest region that counts, as a share of the image: a colour is an "
                               "entity when one connected patch of it is at least this large; smaller patches "
                               "are specks and take the colour around them."),
                _text_length_input(),
                _previous_input(),
            ],
            outputs=[Entities.Output(display_name="entities"),
                     io.Mask.Output(display_name="masks"),
                     io.String.Output(display_name="colours",
                                      tooltip="The pairing used, as a legend: one '#rrggbb: prompt' line per entity.")],
        )

    @classmethod
    def execute(cls, layout, clip, prompts, background="largest", min_area_percent=0.5,
                text_length="padded_512", previous=None) -> io.NodeOutput:
        masks, texts, colours = layouts.painted_layout(layout, prompts, background, min_area_percent / 100.0)
        entities = layouts.entities_from_layout(masks, texts, clip, text_length, previous)
        legend = "\n".join(f"{colour}: {text}" for colour, text in zip(colours, texts))
        return io.NodeOutput(entities, masks, legend)


class EliGenBoxLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenBoxLayout",
            display_name="EliGen Box Layout",
            category=CATEGORY,
            description="Entities from boxes written as text, one 'x, y, w, h' line per entity (for API and "
                        "headless use). With units 'auto', a layout whose numbers are all at most 1 is read as "
                        "fractions of the image (so '0, 0, 1, 1' is the whole image), any other as pixels; the "
                        "'boxes' output says how every line was read.",
            inputs=[
                io.String.Input("boxes", multiline=True, default="",
                                tooltip="One box per line: 'x, y, w, h' (left, top, width, height), in pixels "
                                "or as fractions of the image size (see units)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One entity prompt per line, in the order of the boxes."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used for every entity prompt."),
                io.Int.Input("width", default=1024, min=8, max=16384, step=8,
                             tooltip="Width of the image to generate, in pixels."),
                io.Int.Input("height", default=1024, min=8, max=16384, step=8,
                             tooltip="Height of the image to generate, in pixels."),
                io.Combo.Input("units", options=list(layouts.UNITS), default="auto",
                               tooltip="pixels, fractions of the width/height, or auto: fractions when every "
                               "number of every line is at most 1 ('0, 0, 1, 1' = the whole image), pixels when "
                               "every line has a bigger one. Numbers are plain decimals (12, 0.5, 1e2)."),
                _text_length_input(),
                _previous_input(),
            ],
            outputs=[Entities.Output(display_name="entities"), io.Mask.Output(display_name="masks"),
                     io.String.Output(display_name="boxes", tooltip="How each line was read: its units and "
                                      "the box in pixels.")],
        )

    @classmethod
    def execute(cls, boxes, prompts, clip, width=1024, height=1024, units="auto", text_length="padded_512",
                previous=None) -> io.NodeOutput:
        masks, texts, reading = layouts.boxes_layout(boxes, prompts, width, height, units)
        logging.info("EliGen Box Layout:\n%s", reading)
        return io.NodeOutput(layouts.entities_from_layout(masks, texts, clip, text_length, previous), masks, reading)


NODES = [EliGenPaintedLayout, EliGenBoxLayout]
