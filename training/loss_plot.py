"""The loss curve of a run as a picture, drawn with PIL alone (the node's loss_graph output, loss.png)."""

import math

from PIL import Image, ImageDraw


def loss_graph(losses, width=640, height=320):
    """A PIL image of the loss per step (grey) and its moving average (blue), drawn with PIL alone."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 12, height - 28
    draw.rectangle([left, top, right, bottom], outline="black")
    values = [float(v) for _, v in losses if math.isfinite(float(v))]
    if not values:
        draw.text((left + 8, top + 8), "no loss values yet", fill="black")
        return image
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    steps = [s for s, v in losses if math.isfinite(float(v))]
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step, value):
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (value - low) / (high - low) * (bottom - top)
        return x, y

    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(170, 170, 170), width=1)
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    draw.line([point(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    draw.text((4, top), f"{high:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 6), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 4), f"loss (last {values[-1]:.4g})", fill=(30, 90, 200))
    return image
