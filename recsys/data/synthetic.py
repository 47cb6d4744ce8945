"""A small generated dataset whose item text and user behaviour share one latent structure.

Items belong to a topic and a subtopic; both supply the words of the item's title, its brand
and its categories. Users prefer a few topics and move through the catalogue as a Markov chain
that mostly stays in the current topic (and usually the subtopic). Items that read alike are
therefore consumed together, which is the premise of content-based semantic IDs, so a model
that uses them should beat one that sees only opaque ids.

Timestamps: by default the gaps between a user's events are uniform (10 minutes to 30 days) and
independent of the items, so time carries no signal. With ``time_signal: true`` the gap before
each event decides the step instead: with probability ``stay_probability`` the gap is short
(log-uniform, 1 minute to 1 day) and the user stays in the current topic (and usually the
subtopic); otherwise the gap is long (log-uniform, 7 to 60 days) and the user switches to
another topic drawn from their preferences. The fraction of steps that stay is unchanged, so a
time-blind model sees the same chain as before, while a model that reads the gap before the
next event (``Batch.target_time - timestamps[:, -1]``) knows whether the next item stays in the
topic. (The gaps between history events tell the model how this user's stays and switches look.)

With ``time_signal_kind: pace`` the signal is one a model can use without the target's time: each
user is in a mode, *focused* or *browsing*, that persists from one step to the next with
probability 0.9. Focused steps come after a short gap and stay in the subtopic; browsing steps come
after a long gap and switch to another preferred topic with probability 2 (1 - stay_probability)
(else stay in the topic), so the share of steps that stay is still about ``stay_probability``. The
gaps before the last history events give the current mode, hence how likely the next item stays;
the items alone tell it only when the user just switched.

With ``time_signal_kind: decay`` interest fades with time, not with position: the gaps are drawn
independently of the items (log-uniform, 1 minute to 60 days), and with probability
``stay_probability`` the next item returns to the subtopic of an earlier item drawn with weight
exp(-age / 1 day), its age counted to the next event (else a topic from the user's preferences).
Which past items still count depends on the gaps between them, which the items do not show; and
since every age shifts by the same gap before the next event, the weights are the same counted
from the last history event, so the signal needs nothing of the target's time.

With ``time_signal_kind: session`` a detour within a session returns, and a new session starts a
new interest: each gap is short (1 minute to 1 hour) or long (1 to 30 days) with probability 1/2,
drawn independently of the items. With probability ``stay_probability`` the next item is in the
user's current interest (a subtopic); otherwise it is in another preferred topic, and that item
becomes the interest only when it came after a long gap (a new session), else it is a detour and
the interest stays. After ``A A B`` the next item is in B's subtopic when the gap before B was
long and back in A's when it was short: the items cannot tell which, the gap before the last
history event can, and nothing of the target's time is needed.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.data.config import SyntheticConfig
from recsys.data.schema import InteractionData

# topic: (topic words, brands, {subtopic: subtopic words})
_VOCAB: dict[str, tuple[str, str, dict[str, str]]] = {
    "Skin Care": ("facial glow radiance smoothing nourishing complexion dermal", "Dermalux Purelle Glowlab", {
        "Cleansers": "foaming cleanser purifying micellar", "Serums": "vitamin retinol peptide concentrate",
        "Moisturizers": "hydrating cream barrier ceramide", "Masks": "clay sheet overnight detox"}),
    "Hair Care": ("hair scalp shine frizz volumizing silky strands", "Tressa Mane&Co Lockwell", {
        "Shampoo": "shampoo clarifying sulfate-free lather", "Conditioner": "conditioner detangling leave-in softening",
        "Styling": "mousse pomade hold texturizing", "Treatments": "keratin bond repair argan"}),
    "Makeup": ("pigment blendable matte long-wear flawless buildable", "Chroma Velour Palette&Pout", {
        "Lips": "lipstick gloss liner tint", "Eyes": "mascara eyeliner eyeshadow lash",
        "Face": "foundation concealer primer powder", "Cheeks": "blush bronzer highlighter contour"}),
    "Fragrance": ("fragrance scent aroma notes perfume eau", "Maison Ciel Noctis Aurelle", {
        "Floral": "rose jasmine peony bouquet", "Woody": "cedar sandalwood vetiver oud",
        "Fresh": "citrus bergamot aquatic neroli", "Oriental": "amber vanilla musk incense"}),
    "Nails": ("nail polish manicure cuticle chip-resistant glossy", "Lacquera Tipsy Polished", {
        "Polish": "shade enamel quick-dry opaque", "Gel": "gel uv led soak-off",
        "Nail Tools": "file buffer nipper pusher"}),
    "Bath & Body": ("body bath shower pampering spa relaxing", "Soakery Lathera Bodyful", {
        "Body Wash": "wash scrub exfoliating loofah", "Body Lotion": "butter balm shea whipped",
        "Bath Soaks": "salts bomb epsom fizzing", "Deodorant": "deodorant antiperspirant roll-on odor",
        "Hand Care": "hand sanitizing cracked knuckle"}),
    "Men's Grooming": ("men grooming beard shave razor rugged barber", "Ironjaw Gentry Buckhorn", {
        "Shaving": "foam blade aftershave cartridge", "Beard Care": "beard oil comb wax",
        "Trimmers": "trimmer cordless rechargeable precision"}),
    "Beauty Tools": ("tool device professional ergonomic electric ceramic", "Voltique Sleekr Mirra", {
        "Hair Dryers": "dryer ionic diffuser blowout", "Straighteners": "straightener flat iron titanium",
        "Brushes": "brush bristle kabuki sponge", "Mirrors": "mirror lighted magnifying vanity"}),
    "Sun Care": ("sun spf uv broad-spectrum beach outdoor", "Solara Helios Dunebay", {
        "Sunscreen": "sunscreen water-resistant sport mineral", "After Sun": "aloe cooling after-sun relief",
        "Self Tanner": "tanner bronzing tanning streak-free"}),
    "Oral Care": ("oral teeth dental mouth whitening gums breath", "Brightbite Dentiva Smileco", {
        "Toothpaste": "toothpaste fluoride cavity tartar", "Mouthwash": "mouthwash rinse alcohol-free antiseptic",
        "Toothbrushes": "toothbrush sonic bristles replacement", "Floss": "floss picks waxed interdental"}),
}
_NOISE = ("new classic deluxe original premium natural organic unscented mini refill gift-set travel-size "
          "value-pack limited-edition sensitive everyday").split()
_SYLLABLES = "ka lo mi ne ru sa ti vo ze pa qui bel dor fen gam hix jun kel mor nax".split()
_SAME_SUBTOPIC = 0.7  # when staying in a topic, how often the next item is also in the same subtopic
_ZIPF_EXPONENT = 1.0
_NO_BRAND = 0.15  # share of items without a brand, as in real catalogues
_MAX_TRIES = 8  # rejection-sampling attempts before falling back to the most popular unseen item
_SHORT_GAP_S = (60, 86_400)  # time_signal: the gap before a step that stays in the topic
_LONG_GAP_S = (7 * 86_400, 60 * 86_400)  # ... and before one that switches topic
_PACE_PERSISTENCE = 0.9  # time_signal_kind pace: probability that the user's mode carries over a step
_DECAY_GAP_S = (60, 60 * 86_400)  # time_signal_kind decay: every gap, independent of the items
_DECAY_S = 86_400  # ... and the time constant of an earlier item's pull on the next one
_SESSION_GAP_S = {False: (60, 3_600), True: (86_400, 30 * 86_400)}  # time_signal_kind session: short, long


@dataclass
class _Topic:
    name: str
    words: list[str]
    brands: list[str]
    subtopics: list[tuple[str, list[str]]]


def _topics(n_topics: int) -> list[_Topic]:
    """The readable topics first, then made-up ones; fixed text, independent of the seed."""
    topics = [
        _Topic(name, words.split(), brands.split(), [(s, w.split()) for s, w in subs.items()])
        for name, (words, brands, subs) in list(_VOCAB.items())[:n_topics]
    ]
    return topics + [_made_up_topic(index) for index in range(len(topics), n_topics)]


def _made_up_topic(index: int) -> _Topic:
    """A topic of pseudo-words, for configs with more topics than the readable list."""
    vocab = np.random.default_rng(index)  # fixed per topic, so the text never depends on the seed

    def word(n_syllables: int) -> str:
        return "".join(vocab.choice(_SYLLABLES, n_syllables))

    n_subtopics = int(vocab.integers(3, 6))
    subtopics = [(f"{word(2).title()} {word(2)}", [word(3) for _ in range(4)]) for _ in range(n_subtopics)]
    brands = [word(3).title() for _ in range(3)]
    return _Topic(f"Topic {word(2).title()}", [word(3) for _ in range(6)], brands, subtopics)


@dataclass
class _Catalog:
    """Item groups and cumulative popularity weights, as lists for fast ``bisect`` sampling."""

    sub_items: list[list[int]]  # subtopic -> item indices, most popular first
    sub_cdf: list[list[float]]
    topic_subs: list[list[int]]  # topic -> global subtopic indices
    topic_sub_cdf: list[list[float]]
    item_topic: np.ndarray
    item_sub: np.ndarray


def _catalog(topics: list[_Topic], n_items: int, rng: np.random.Generator) -> _Catalog:
    """Spread items evenly over topics and their subtopics, in random id order."""
    item_topic = rng.permutation(np.arange(n_items) % len(topics))
    item_sub = np.empty(n_items, dtype=np.int64)
    sub_items: list[list[int]] = []
    topic_subs: list[list[int]] = []
    for t, topic in enumerate(topics):
        members = np.flatnonzero(item_topic == t)
        n_subs = min(len(topic.subtopics), len(members))
        subs = list(range(len(sub_items), len(sub_items) + n_subs))
        for k in range(n_subs):
            # members are in random order, so popularity rank is random within each subtopic.
            chosen = members[k::n_subs]
            item_sub[chosen] = k
            sub_items.append(chosen.tolist())
        topic_subs.append(subs)
    zipf = [np.cumsum(1.0 / np.arange(1, len(s) + 1) ** _ZIPF_EXPONENT).tolist() for s in sub_items]
    sizes = [np.cumsum([len(sub_items[s]) for s in subs]).tolist() for subs in topic_subs]
    return _Catalog(sub_items, zipf, topic_subs, sizes, item_topic, item_sub)


def _items(topics: list[_Topic], catalog: _Catalog, rng: np.random.Generator) -> pd.DataFrame:
    n_items = len(catalog.item_topic)
    codes = rng.permutation(n_items) + 1000  # unique model numbers make every title unique
    titles, brands, categories = [], [], []
    for index in range(n_items):
        topic = topics[catalog.item_topic[index]]
        sub_name, sub_words = topic.subtopics[catalog.item_sub[index]]
        brand = None if rng.random() < _NO_BRAND else str(rng.choice(topic.brands))
        noise = rng.choice(_NOISE, rng.integers(1, 3), replace=False)
        core = [*rng.choice(sub_words, 2, replace=False), *rng.choice(topic.words, 2, replace=False)]
        words = [*noise[1:], *core, noise[0]]
        text = " ".join(w.replace("-", " ").title() for w in words)
        titles.append(f"{brand + ' ' if brand else ''}{text}, No. {codes[index]}")
        brands.append(brand)
        categories.append([topic.name, sub_name])
    return pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype=np.int64),
            "raw_id": [f"SYN{i:06d}" for i in range(1, n_items + 1)],
            "title": pd.Series(titles, dtype=object),
            "brand": pd.Series(brands, dtype=object),
            "categories": pd.Series(categories, dtype=object),
        }
    )


class _Uniforms:
    """Uniform draws served from a pre-drawn block: per-step ``rng.random()`` calls are slow."""

    def __init__(self, rng: np.random.Generator, block: int = 4096):
        self.rng, self.block = rng, block
        self.values: list[float] = []
        self.pos = 0

    def __call__(self) -> float:
        if self.pos == len(self.values):
            self.values, self.pos = self.rng.random(self.block).tolist(), 0
        self.pos += 1
        return self.values[self.pos - 1]


def _draw(cdf: list[float], u: float) -> int:
    """Index drawn with the weights whose running sum is ``cdf``."""
    return min(bisect.bisect_right(cdf, u * cdf[-1]), len(cdf) - 1)


def _preferences(n_users: int, n_topics: int, rng: np.random.Generator) -> list[list[float]]:
    """Each user's topic weights as a running sum: 95 % on 1-3 favourite topics, 5 % spread."""
    cdfs = []
    for _ in range(n_users):
        favourites = rng.choice(n_topics, size=rng.integers(1, min(3, n_topics) + 1), replace=False)
        weights = np.full(n_topics, 0.05 / n_topics)
        weights[favourites] += 0.95 * rng.dirichlet(np.ones(len(favourites)))
        cdfs.append(np.cumsum(weights).tolist())
    return cdfs


def _sequence(length: int, prefs: list[float], catalog: _Catalog, stay: float, u: _Uniforms,
              timed: bool = False, pace: bool = False) -> tuple[list[int], list[int]]:
    """One user's items: a topic/subtopic Markov chain with Zipf popularity and no repeats.

    ``timed`` (the time signal) also draws the gap before each item (the first: the user's start
    offset): a short gap when the step stays in the topic, a long one when it switches to another
    preferred topic. Without it the draws are exactly the original generator's, and no gaps.
    ``pace`` (with ``timed``): the gap and the move follow the user's persistent mode instead (see
    the module's docstring)."""
    seen: set[int] = set()
    items, gaps = [], []
    topic = sub = -1
    focused = pace and u() < 0.5  # no draw without pace: the other data stay exactly as they were
    for _ in range(length):
        if pace:
            focused = focused if u() < _PACE_PERSISTENCE else not focused
            stays = topic >= 0 and (focused or u() >= 2 * (1 - stay))
            short = focused
        else:
            stays = short = topic >= 0 and u() < stay
        if timed:
            low, high = _SHORT_GAP_S if short else _LONG_GAP_S
            gaps.append(int(low * (high / low) ** u()))  # log-uniform in [low, high)
        if not stays:
            topic = _other_topic(prefs, topic, u) if timed else _draw(prefs, u())
            sub = catalog.topic_subs[topic][_draw(catalog.topic_sub_cdf[topic], u())]
        elif pace and focused:
            pass  # a focused step stays in the subtopic
        elif u() >= _SAME_SUBTOPIC:
            sub = catalog.topic_subs[topic][_draw(catalog.topic_sub_cdf[topic], u())]
        item = _unseen_item(sub, topic, catalog, seen, u)
        seen.add(item)
        items.append(item)
        # A fallback may have left the subtopic; the chain continues from where the user is.
        topic, sub = int(catalog.item_topic[item]), _global_sub(catalog, item)
    return items, gaps


def _decaying_sequence(length: int, prefs: list[float], catalog: _Catalog, stay: float, u: _Uniforms
                       ) -> tuple[list[int], list[int]]:
    """One user's items and gaps under ``time_signal_kind: decay`` (see the module's docstring)."""
    seen: set[int] = set()
    items, gaps, times = [], [], []
    now = 0
    low, high = _DECAY_GAP_S
    for _ in range(length):
        gaps.append(int(low * (high / low) ** u()))
        now += gaps[-1]
        if items and u() < stay:
            # weights relative to the newest item (its weight 1): the gap before now cancels out
            cdf = np.cumsum(np.exp((np.asarray(times) - times[-1]) / _DECAY_S)).tolist()
            anchor = items[_draw(cdf, u())]
            topic, sub = int(catalog.item_topic[anchor]), _global_sub(catalog, anchor)
        else:
            topic = _draw(prefs, u())
            sub = catalog.topic_subs[topic][_draw(catalog.topic_sub_cdf[topic], u())]
        item = _unseen_item(sub, topic, catalog, seen, u)
        seen.add(item)
        items.append(item)
        times.append(now)
    return items, gaps


def _session_sequence(length: int, prefs: list[float], catalog: _Catalog, stay: float, u: _Uniforms
                      ) -> tuple[list[int], list[int]]:
    """One user's items and gaps under ``time_signal_kind: session`` (see the module's docstring)."""
    seen: set[int] = set()
    items, gaps = [], []
    interest: tuple[int, int] | None = None  # (topic, subtopic)
    for _ in range(length):
        long_gap = u() < 0.5
        low, high = _SESSION_GAP_S[long_gap]
        gaps.append(int(low * (high / low) ** u()))
        if interest is not None and u() < stay:
            topic, sub = interest
        else:
            topic = _other_topic(prefs, -1 if interest is None else interest[0], u)
            sub = catalog.topic_subs[topic][_draw(catalog.topic_sub_cdf[topic], u())]
            if interest is None or long_gap:  # a new session's first move sets the interest; else a detour
                interest = topic, sub
        item = _unseen_item(sub, topic, catalog, seen, u)
        seen.add(item)
        items.append(item)
    return items, gaps


def _other_topic(prefs: list[float], current: int, u: _Uniforms) -> int:
    """A topic from the user's preferences other than ``current`` (a few tries, then any)."""
    topic = _draw(prefs, u())
    for _ in range(_MAX_TRIES):
        if topic != current:
            return topic
        topic = _draw(prefs, u())
    return (current + 1) % len(prefs) if topic == current else topic


def _unseen_item(sub: int, topic: int, catalog: _Catalog, seen: set[int], u: _Uniforms) -> int:
    members = catalog.sub_items[sub]
    for _ in range(_MAX_TRIES):
        item = members[_draw(catalog.sub_cdf[sub], u())]
        if item not in seen:
            return item
    # Rejection failed: most popular unseen item in the subtopic, then the topic, then anywhere.
    for group in (members, *(catalog.sub_items[s] for s in catalog.topic_subs[topic])):
        for item in group:
            if item not in seen:
                return item
    return next(i for i in range(len(catalog.item_topic)) if i not in seen)


def _global_sub(catalog: _Catalog, item: int) -> int:
    return catalog.topic_subs[int(catalog.item_topic[item])][int(catalog.item_sub[item])]


_KINDS = {"decay": _decaying_sequence, "session": _session_sequence}  # the time signals with a generator of their own


def generate_synthetic(cfg: SyntheticConfig) -> InteractionData:
    """Items (title, brand, categories) and users' sequences, deterministic given ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    topics = _topics(cfg.n_topics)
    catalog = _catalog(topics, cfg.n_items, rng)
    items = _items(topics, catalog, rng)
    prefs = _preferences(cfg.n_users, cfg.n_topics, rng)
    lengths = rng.integers(cfg.min_length, cfg.max_length + 1, size=cfg.n_users)
    starts = rng.integers(1_400_000_000, 1_430_000_000, size=cfg.n_users)
    uniforms = _Uniforms(rng)
    sequences, timestamps = [], []
    for user in range(cfg.n_users):
        if cfg.time_signal and cfg.time_signal_kind in _KINDS:
            seq, gaps = _KINDS[cfg.time_signal_kind](int(lengths[user]), prefs[user], catalog, cfg.stay_probability,
                                                     uniforms)
        else:
            seq, gaps = _sequence(int(lengths[user]), prefs[user], catalog, cfg.stay_probability, uniforms,
                                  timed=cfg.time_signal, pace=cfg.time_signal_kind == "pace")
        if not cfg.time_signal:  # the original draws, in the original order: the data is exactly as before
            gaps = rng.integers(600, 30 * 86_400, size=len(seq))  # strictly positive: times increase
        sequences.append(np.asarray(seq, dtype=np.int64) + 1)  # item index -> 1-based item id
        timestamps.append(starts[user] + np.cumsum(gaps, dtype=np.int64))
    frame = pd.DataFrame(
        {"user_id": [f"u{i + 1}" for i in range(cfg.n_users)], "item_ids": sequences, "timestamps": timestamps}
    )
    stats = {"source": "synthetic", "config": dataclasses.asdict(cfg), "dropped": {}}
    data = InteractionData(items=items, sequences=frame, stats=stats)
    data.validate("synthetic")
    return data
