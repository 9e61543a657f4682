"""The embedded default: a small generated multimodal recommendation world.

Real data cannot ship with the project, so the demo runs on a world generated here, written
in the same raw layout as the real datasets (interactions.csv, items.jsonl, images/ID.jpg;
see mmscale/build/raw.py). Its structure is known and learnable from content alone:

* every item is a picture of a coloured shape on a patterned background; its title and
  description name the same attributes the picture shows, so image and text agree;
* every user likes one or two colours and a shape (and, weakly, a pattern) and picks items
  with probability proportional to exp(strength * preference score), so a model that
  recovers a user's tastes from their history ranks their next item well, even a cold one;
* the next pick often shares an attribute with the previous one (a sequential signal),
  a small fraction of picks is uniform noise, and item popularity is mildly skewed.

Everything is drawn from one numpy Generator seeded by WorldSpec.seed, and every file is
written without times or machine-dependent metadata, so the same spec gives the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (40, 165, 70),
    "teal": (20, 160, 160),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PATTERNS = ("plain", "striped", "dotted", "checkered", "gradient")
# Background tones are a distractor: no user cares about them, and none of them is a shape colour.
TONES: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "black": (30, 30, 30),
    "cream": (240, 230, 200),
    "slate": (90, 100, 120),
}
SIZES = ("small", "medium", "large")
SIZE_RADIUS = {"small": 0.22, "medium": 0.30, "large": 0.38}  # shape radius / image side
DESCRIPTION_TEMPLATES = (
    "A {size} {colour} {shape} on a {pattern} {tone} background.",
    "This picture shows a {size} {colour} {shape} set against a {pattern} {tone} background.",
    "{Size} {colour} {shape}, drawn over a {pattern} {tone} background.",
)
EPOCH_2020 = 1_577_836_800  # 2020-01-01T00:00:00Z
DAY = 86_400


@dataclass(frozen=True)
class WorldSpec:
    num_users: int = 400
    num_items: int = 600
    min_interactions_per_user: int = 15
    max_interactions_per_user: int = 60
    image_size: int = 64
    seed: int = 0
    missing_image_fraction: float = 0.02
    missing_description_fraction: float = 0.02
    preference_strength: float = 3.0  # affinity = exp(strength * score): higher is more peaked
    second_colour_probability: float = 0.5  # users who also like a second colour
    sequential_fraction: float = 0.25  # picks restricted to items sharing an attribute with the previous pick
    noise_fraction: float = 0.05  # picks uniform over the items the user has not seen
    popularity_sigma: float = 0.5  # log-normal item popularity: mild skew
    mean_gap_days: float = 1.5  # mean time between a user's consecutive interactions
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError("num_users and num_items must be positive")
        if not 1 <= self.min_interactions_per_user <= self.max_interactions_per_user:
            raise ValueError("need 1 <= min_interactions_per_user <= max_interactions_per_user")
        # Users never pick the same item twice, so each needs enough distinct items.
        if self.max_interactions_per_user > self.num_items:
            raise ValueError("max_interactions_per_user exceeds num_items")
        for name in ("missing_image_fraction", "missing_description_fraction", "sequential_fraction", "noise_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.sequential_fraction + self.noise_fraction > 1.0:
            raise ValueError("sequential_fraction + noise_fraction exceeds 1")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16 pixels")


@dataclass
class _Items:
    """Item attributes as index arrays (one entry per item, item k has id str(k + 1))."""

    colour: np.ndarray
    shape: np.ndarray
    pattern: np.ndarray
    tone: np.ndarray
    size: np.ndarray
    centre: np.ndarray  # (n, 2) offsets from the image centre, as fractions of the side
    rotation: np.ndarray  # degrees
    pattern_period: np.ndarray  # stripe/dot/check spacing, as fractions of the side
    template: np.ndarray
    popularity: np.ndarray
    has_image: np.ndarray
    has_description: np.ndarray


@dataclass
class _Users:
    colour_weight: np.ndarray  # (users, colours)
    shape_weight: np.ndarray  # (users, shapes)
    pattern_weight: np.ndarray  # (users, patterns)


def _exact_subset(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """A boolean mask with exactly round(fraction * n) True entries at random places."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(fraction * n))]] = True
    return mask


def _draw_items(rng: np.random.Generator, spec: WorldSpec) -> _Items:
    n = spec.num_items
    size = rng.integers(len(SIZES), size=n)
    radius = np.array([SIZE_RADIUS[SIZES[s]] for s in size])
    # Keep the whole shape inside the picture: the centre moves at most (0.5 - radius - margin).
    slack = np.maximum(0.5 - radius - 0.04, 0.0)
    return _Items(
        colour=rng.integers(len(COLOURS), size=n),
        shape=rng.integers(len(SHAPES), size=n),
        pattern=rng.integers(len(PATTERNS), size=n),
        tone=rng.integers(len(TONES), size=n),
        size=size,
        centre=rng.uniform(-1.0, 1.0, size=(n, 2)) * slack[:, None],
        rotation=rng.uniform(0.0, 360.0, size=n),
        pattern_period=rng.uniform(0.12, 0.22, size=n),
        template=rng.integers(len(DESCRIPTION_TEMPLATES), size=n),
        popularity=rng.lognormal(0.0, spec.popularity_sigma, size=n),
        has_image=~_exact_subset(rng, n, spec.missing_image_fraction),
        has_description=~_exact_subset(rng, n, spec.missing_description_fraction),
    )


def _draw_users(rng: np.random.Generator, spec: WorldSpec) -> _Users:
    n = spec.num_users
    colour_weight = np.zeros((n, len(COLOURS)))
    shape_weight = np.zeros((n, len(SHAPES)))
    pattern_weight = np.zeros((n, len(PATTERNS)))
    for u in range(n):
        first, second = rng.choice(len(COLOURS), size=2, replace=False)
        colour_weight[u, first] = 1.0
        if rng.random() < spec.second_colour_probability:
            colour_weight[u, second] = rng.uniform(0.5, 0.8)
        shape_weight[u, rng.integers(len(SHAPES))] = 1.0
        pattern_weight[u, rng.integers(len(PATTERNS))] = rng.uniform(0.2, 0.5)
    return _Users(colour_weight, shape_weight, pattern_weight)


class _Groups:
    """Items grouped by what users care about (colour, shape, pattern): a user's score is a function
    of the group alone, so picks are drawn as a group, then an item within it by popularity. This
    keeps generation linear in users and items (a million items fits) instead of users x items."""

    def __init__(self, items: _Items):
        shapes, patterns = len(SHAPES), len(PATTERNS)
        self.count = len(COLOURS) * shapes * patterns
        group = np.arange(self.count)
        # Rows: colour, shape, pattern of each group; also what "shares an attribute" compares.
        self.attributes = np.stack([group // (shapes * patterns), group // patterns % shapes, group % patterns])
        self.of_item = (items.colour * shapes + items.shape) * patterns + items.pattern
        self.order = np.argsort(self.of_item, kind="stable")  # items sorted by group
        self.cumulative = np.cumsum(items.popularity[self.order])
        self.first = np.searchsorted(self.of_item[self.order], group)
        self.size = np.bincount(self.of_item, minlength=self.count)
        self.mass = np.bincount(self.of_item, weights=items.popularity, minlength=self.count)
        self.mass_before = np.concatenate([[0.0], self.cumulative])[self.first]

    def scores(self, users: _Users) -> np.ndarray:
        """(users, groups): the sum of the user's weights for the group's attributes."""
        colour, shape, pattern = self.attributes
        return users.colour_weight[:, colour] + users.shape_weight[:, shape] + users.pattern_weight[:, pattern]

    def item_by_popularity(self, group: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """An item of each group drawn with probability proportional to popularity."""
        position = np.searchsorted(self.cumulative, self.mass_before[group] + uniform * self.mass[group], side="right")
        return self.order[np.clip(position, self.first[group], self.first[group] + self.size[group] - 1)]


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One column index per row, drawn with probability proportional to the row's weights."""
    cumulative = np.cumsum(weights, axis=1)
    threshold = rng.random(len(weights)) * cumulative[:, -1]
    return np.minimum((cumulative <= threshold[:, None]).sum(axis=1), weights.shape[1] - 1)


def _draw_sequences(rng: np.random.Generator, spec: WorldSpec, items: _Items, groups: _Groups, scores: np.ndarray, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(users, longest) item indices, each user's in order without repeats and padded with -1, and
    the users' lengths; one step of every user at a time.

    A pick is exactly a draw over the user's unseen items proportional to exp(strength * score) x
    popularity: the group is drawn from each user's unseen popularity mass per group, the item within
    it by popularity, redrawn while it is one the user has already picked (rejection keeps the draw
    exact: the group still holds unseen mass)."""
    lengths = rng.integers(spec.min_interactions_per_user, spec.max_interactions_per_user + 1, size=spec.num_users)
    appeal = np.exp(spec.preference_strength * scores)
    unseen_mass = np.tile(groups.mass, (spec.num_users, 1))
    unseen_count = np.tile(groups.size, (spec.num_users, 1))
    picks = np.full((spec.num_users, lengths.max()), -1, dtype=np.int64)
    for step in tqdm(range(lengths.max()), desc="interactions: steps", unit="step", disable=not progress):
        users = np.flatnonzero(lengths > step)
        mode = rng.random(len(users))
        kind = rng.integers(len(groups.attributes), size=len(users))
        noise = mode < spec.noise_fraction
        item = np.empty(len(users), dtype=np.int64)

        chooser = ~noise
        weights = appeal[users[chooser]] * unseen_mass[users[chooser]]
        if step > 0:
            sequential = mode[chooser] < spec.noise_fraction + spec.sequential_fraction
            previous = groups.of_item[picks[users[chooser], step - 1]]
            attribute = groups.attributes[kind[chooser]]  # (choosers, groups): the compared attribute
            shares = attribute == attribute[np.arange(len(previous)), previous][:, None]
            restricted = weights * shares
            # Fall back to the unrestricted pick when every sharing item is already seen.
            use = sequential & (restricted.sum(axis=1) > 0)
            weights[use] = restricted[use]
        group = _categorical(rng, weights)
        chooser_index = np.cumsum(chooser) - 1  # position of each chooser's row in `group`

        pending = np.ones(len(users), dtype=bool)
        while pending.any():
            todo = np.flatnonzero(pending)
            is_noise = noise[todo]
            draws = np.empty(len(todo), dtype=np.int64)
            draws[is_noise] = rng.integers(spec.num_items, size=int(is_noise.sum()))
            picked_group = group[chooser_index[todo[~is_noise]]]
            draws[~is_noise] = groups.item_by_popularity(picked_group, rng.random(len(picked_group)))
            item[todo] = draws
            pending[todo] = (picks[users[todo], :step] == draws[:, None]).any(axis=1)

        picks[users, step] = item
        picked = groups.of_item[item]
        unseen_count[users, picked] -= 1
        unseen_mass[users, picked] -= items.popularity[item]
        unseen_mass[users, picked] *= unseen_count[users, picked] > 0  # exactly zero once a group is used up
    return picks, lengths


def _ratings(rng: np.random.Generator, picked_scores: np.ndarray, best_score: np.ndarray) -> np.ndarray:
    """1-5 stars rising with the item's score relative to the user's best possible score."""
    relative = picked_scores / np.maximum(best_score, 1e-9)  # a tiny world may hold no item the user likes
    stars = np.rint(1.5 + 3.5 * relative + rng.normal(0.0, 0.6, size=relative.shape))
    return np.clip(stars, 1, 5).astype(int)


def _timestamps(rng: np.random.Generator, spec: WorldSpec, lengths: np.ndarray) -> np.ndarray:
    """Per user, strictly increasing unix seconds in 2020: a random start, then gaps of at least a
    minute; one flat array, users one after another."""
    start = EPOCH_2020 + rng.integers(0, 200 * DAY, size=len(lengths))
    gaps = 60 + np.floor(rng.exponential(spec.mean_gap_days * DAY, size=int(lengths.sum()))).astype(np.int64)
    user_first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    elapsed = np.cumsum(gaps)
    # Each user's clock starts at their first interaction: subtract the running sum up to it.
    return np.repeat(start - elapsed[user_first], lengths) + elapsed


def _attribute_words(items: _Items, k: int) -> dict[str, str]:
    return {
        "colour": list(COLOURS)[items.colour[k]],
        "shape": SHAPES[items.shape[k]],
        "pattern": PATTERNS[items.pattern[k]],
        "tone": list(TONES)[items.tone[k]],
        "size": SIZES[items.size[k]],
    }


def _item_record(items: _Items, k: int) -> dict:
    words = _attribute_words(items, k)
    item_id = str(k + 1)
    description = None
    if items.has_description[k]:
        description = DESCRIPTION_TEMPLATES[items.template[k]].format(Size=words["size"].capitalize(), **words)
    return {
        "item_id": item_id,
        "title": f"{words['pattern'].capitalize()} {words['colour'].capitalize()} {words['shape'].capitalize()} #{item_id}",
        "description": description,
        "genres": [words["colour"], words["shape"], words["pattern"]],
        "image": f"images/{item_id}.jpg" if items.has_image[k] else None,
    }


def _contrast(tone: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pattern ink: the tone shifted towards mid-grey so it stays visible but quiet."""
    shift = -45 if sum(tone) > 3 * 128 else 45
    return tuple(int(np.clip(c + shift, 0, 255)) for c in tone)


def _background(items: _Items, k: int, side: int) -> Image.Image:
    tone = TONES[list(TONES)[items.tone[k]]]
    ink = _contrast(tone)
    pattern = PATTERNS[items.pattern[k]]
    period = max(4, int(round(items.pattern_period[k] * side)))
    if pattern == "gradient":
        # Top-to-bottom blend from the tone to its contrast colour, built as an array (fast).
        t = np.linspace(0.0, 1.0, side)[:, None, None]
        pixels = (1 - t) * np.array(tone) + t * np.array(ink)
        return Image.fromarray(np.broadcast_to(pixels, (side, side, 3)).astype(np.uint8), "RGB")
    image = Image.new("RGB", (side, side), tone)
    draw = ImageDraw.Draw(image)
    if pattern == "striped":
        for x in range(-side, side, period):
            draw.line([(x, side), (x + side, 0)], fill=ink, width=max(1, period // 3))
    elif pattern == "dotted":
        dot = max(1, period // 5)
        for y in range(period // 2, side, period):
            for x in range(period // 2, side, period):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=ink)
    elif pattern == "checkered":
        for y in range(0, side, period):
            for x in range((y // period % 2) * period, side, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], fill=ink)
    return image


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles, cycling through the given radii."""
    n = len(radii)
    angles = np.deg2rad(rotation) + 2 * np.pi * np.arange(n) / n
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.1] * 4, rotation), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.15] * 3, rotation), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5] * 5, rotation), fill=fill)
    elif shape == "cross":
        # A plus sign: two bars; rotation is left out so it never reads as an "x" shape.
        arm = r * 0.35
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _render_jpeg(items: _Items, k: int, side: int, quality: int) -> bytes:
    # Drawn at twice the size and downsampled: cheap anti-aliasing for small pictures.
    big = 2 * side
    image = _background(items, k, big)
    radius = SIZE_RADIUS[SIZES[items.size[k]]] * big
    cx, cy = (0.5 + items.centre[k]) * big
    colour = COLOURS[list(COLOURS)[items.colour[k]]]
    _draw_shape(ImageDraw.Draw(image), SHAPES[items.shape[k]], cx, cy, radius, float(items.rotation[k]), colour)
    buffer = io.BytesIO()
    # No EXIF, ICC or optimisation passes: the bytes depend only on the pixels and the quality.
    image.resize((side, side), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _ground_truth(spec: WorldSpec, items: _Items, users: _Users) -> dict:
    def named(weights: np.ndarray, names: Iterable[str]) -> dict[str, float]:
        return {name: round(float(w), 4) for name, w in zip(names, weights) if w > 0}

    return {
        "spec": asdict(spec),
        "vocabulary": {"colour": list(COLOURS), "shape": list(SHAPES), "pattern": list(PATTERNS), "tone": list(TONES), "size": list(SIZES)},
        "items": {
            str(k + 1): {**_attribute_words(items, k), "popularity": round(float(items.popularity[k]), 4)}
            for k in range(spec.num_items)
        },
        "users": {
            str(u + 1): {
                "colours": named(users.colour_weight[u], COLOURS),
                "shapes": named(users.shape_weight[u], SHAPES),
                "patterns": named(users.pattern_weight[u], PATTERNS),
            }
            for u in range(spec.num_users)
        },
    }


def _readme(spec: WorldSpec, summary: dict) -> str:
    return f"""# Generated multimodal recommendation world

Written by `mmscale.build.world.generate_world` (seed {spec.seed}); regenerate it rather than edit it.
Same layout as the real datasets: `interactions.csv`, `items.jsonl`, `images/ITEM.jpg`.

| file | what |
| --- | --- |
| interactions.csv | `user_id,item_id,rating,timestamp`: {summary['interactions']} interactions by {summary['users']} users on {summary['items']} items, ratings 1-5, unix seconds in 2020, sorted by time |
| items.jsonl | one item per line: `item_id, title, description, genres[], image` (`image` is relative to this folder, or null) |
| images/ITEM.jpg | {summary['images']} pictures, {spec.image_size}x{spec.image_size} JPEG |
| world.json | the ground truth: the spec, every item's attributes and every user's preference weights |

Gaps are deliberate: {summary['missing_images']} items have no image and {summary['missing_descriptions']} have no description.

## Items

Each item is a {'/'.join(SIZES)} shape in one of {len(COLOURS)} colours ({', '.join(COLOURS)}) and
{len(SHAPES)} shapes ({', '.join(SHAPES)}), with random position and rotation, on a background of
one of {len(TONES)} tones ({', '.join(TONES)}) with one of {len(PATTERNS)} patterns ({', '.join(PATTERNS)}).
The title names pattern, colour and shape ("Striped Red Star #12"); the description is a sentence
naming size, colour, shape, pattern and tone; `genres` lists colour, shape and pattern. So the image
and the text carry the same attributes, and either alone identifies what users care about.

## Users

Each user likes one colour (weight 1), with probability {spec.second_colour_probability} a second one
(weight 0.5-0.8), one shape (weight 1) and weakly one pattern (weight 0.2-0.5). Tone and size matter
to nobody. A user's score for an item is the sum of their weights for its attributes, and picks
(never repeating an item) follow these rules:

* with probability {spec.noise_fraction}: uniform over the items not yet picked;
* with probability {spec.sequential_fraction}: among the unpicked items sharing a random attribute
  (colour, shape or pattern) with the previous pick, proportional to the weight below;
* otherwise: proportional to exp({spec.preference_strength} x score) x popularity, where popularity is
  log-normal (sigma {spec.popularity_sigma}).

Each user makes {spec.min_interactions_per_user}-{spec.max_interactions_per_user} picks, starting at a
random time in 2020 with gaps of about {spec.mean_gap_days} days. The rating rises with the item's score
relative to the user's best possible score (plus noise), so preferred items get 4-5 stars.

## What a model can learn

From a user's history, which colours, shapes and patterns they like, recognised in the images or read
in the text; then rank all items, including items never seen in training, by those attributes; the
previous item adds a sequential signal. Random ranking finds a user's last pick in the top 20 for
{20 / spec.num_items:.1%} of users. On the default spec (400 users, 600 items, seed 0), ranking the unseen
items by the true preferences finds it for about 40% of users, and by how often each item's title words
occur in the user's history (a content-only baseline) for about 30%.
"""


def generate_world(out_dir: str | Path, spec: WorldSpec = WorldSpec(), progress: bool = False) -> dict:
    """Writes the world's raw layout into out_dir; returns counts of what was written."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    items = _draw_items(rng, spec)
    users = _draw_users(rng, spec)
    groups = _Groups(items)
    scores = groups.scores(users)
    picks, lengths = _draw_sequences(rng, spec, items, groups, scores, progress)

    # One row per interaction, users one after another; ids are 1-based like MovieLens.
    user = np.repeat(np.arange(spec.num_users), lengths)
    item = picks[picks >= 0]
    best = np.where(groups.size > 0, scores, -np.inf).max(axis=1)
    rating = _ratings(rng, scores[user, groups.of_item[item]], best[user])
    timestamp = _timestamps(rng, spec, lengths)
    rows = np.stack([user + 1, item + 1, rating, timestamp], axis=1)[np.lexsort((rating, item, user, timestamp))]
    with open(out / "interactions.csv", "w", encoding="utf-8", newline="") as f:
        f.write("user_id,item_id,rating,timestamp\n")
        for chunk in np.array_split(rows, max(1, len(rows) // 100_000)):
            f.writelines(f"{u},{i},{r},{t}\n" for u, i, r, t in chunk.tolist())

    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(_item_record(items, k)) + "\n" for k in range(spec.num_items))

    written = set()
    for k in tqdm(np.flatnonzero(items.has_image), desc="images", unit="img", disable=not progress):
        name = f"{k + 1}.jpg"
        (image_dir / name).write_bytes(_render_jpeg(items, k, spec.image_size, spec.jpeg_quality))
        written.add(name)
    # Pictures left by an earlier world in the same folder would otherwise pass as part of this one.
    for stale in image_dir.glob("*.jpg"):
        if stale.name not in written:
            stale.unlink()

    summary = {
        "users": spec.num_users,
        "items": spec.num_items,
        "interactions": len(rows),
        "images": len(written),
        "missing_images": int((~items.has_image).sum()),
        "missing_descriptions": int((~items.has_description).sum()),
    }
    (out / "world.json").write_text(json.dumps(_ground_truth(spec, items, users), indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(spec, summary), encoding="utf-8")
    return summary
