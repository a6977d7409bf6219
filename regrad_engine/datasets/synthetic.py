"""Seeded synthetic corpus of fictional entities with real-world answers.

Every entity (a person, a town or an organisation) has an invented,
pronounceable name that no language model can know, and a handful of facts
whose values are common real-world strings the model can already say
("Lisbon", "dentist", "violin", "1962"). Each entity gets one short document
stating its facts, and each fact one question. Learning therefore only has to
bind the invented name to a known value.

QA pairs are split into train/dev/test by entity, so no document serves two
splits. Everything derives from ``random.Random(seed)``: the same seed gives
the same corpus.

Example:
    >>> corpus = generate_corpus(30, seed=1)
    >>> len(corpus.train) + len(corpus.dev) + len(corpus.test)
    90
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

from regrad_engine.data import write_jsonl

__all__ = [
    "ATTRIBUTES",
    "KINDS",
    "QAPair",
    "SPLITS",
    "SyntheticCorpus",
    "generate_corpus",
]

PathLike = Union[str, Path]
KINDS: tuple[str, ...] = ("person", "place", "organisation")
SPLITS: tuple[str, ...] = ("train", "dev", "test")

# ---------------------------------------------------------------- value pools
_CITIES = ("Paris", "Tokyo", "London", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon",
           "Cairo", "Moscow", "Dublin", "Athens", "Prague", "Warsaw", "Oslo", "Stockholm",
           "Helsinki", "Boston", "Chicago", "Toronto", "Sydney", "Mumbai", "Seoul", "Istanbul",
           "Lima", "Havana", "Nairobi", "Bangkok", "Manila", "Denver", "Seattle", "Venice",
           "Milan", "Munich", "Geneva", "Brussels", "Amsterdam", "Budapest")
_COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Mexico", "Italy", "Spain", "Germany",
              "Egypt", "India", "China", "Kenya", "Peru", "Chile", "Norway", "Sweden",
              "Finland", "Poland", "Greece", "Turkey", "Ireland", "Portugal", "Argentina",
              "Australia", "Russia", "Vietnam", "Morocco", "Nigeria", "Austria", "Denmark")
_PROFESSIONS = ("dentist", "teacher", "baker", "pilot", "nurse", "lawyer", "farmer", "chef",
                "doctor", "architect", "engineer", "journalist", "carpenter", "plumber",
                "painter", "poet", "banker", "surgeon", "librarian", "fisherman", "tailor",
                "sailor", "photographer", "pharmacist", "mechanic", "actor", "judge", "potter",
                "butcher", "astronomer")
_INSTRUMENTS = ("violin", "piano", "guitar", "cello", "flute", "drums", "trumpet", "harp",
                "saxophone", "clarinet", "accordion", "banjo", "oboe", "ukulele", "trombone",
                "tuba", "harmonica", "mandolin", "organ", "viola", "bassoon", "bagpipes")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
            "white", "grey", "silver", "gold", "crimson", "navy", "turquoise", "beige", "maroon")
_SPORTS = ("football", "tennis", "golf", "cricket", "rugby", "basketball", "baseball",
           "hockey", "volleyball", "badminton", "handball", "squash", "polo", "lacrosse",
           "netball", "softball", "table tennis", "water polo")
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Russian", "Japanese", "Chinese",
              "Arabic", "Hindi", "Portuguese", "Dutch", "Greek", "Swedish", "Polish", "Turkish",
              "Korean", "Finnish", "Welsh", "Latin", "Hebrew", "Swahili", "Danish", "Czech")
_RIVERS = ("Danube", "Thames", "Rhine", "Nile", "Seine", "Volga", "Amazon", "Ganges",
           "Mississippi", "Tiber", "Elbe", "Loire", "Mekong", "Yangtze", "Tigris", "Hudson",
           "Shannon", "Douro", "Vistula", "Oder", "Zambezi", "Indus", "Rhone", "Orinoco", "Yukon")
_INDUSTRIES = ("fishing", "mining", "tourism", "farming", "textile", "shipbuilding", "forestry",
               "brewing", "wine", "steel", "glass", "printing", "coffee", "tea", "silk", "salt",
               "wool", "cheese", "timber", "coal", "pottery", "paper", "leather", "sugar", "cotton")
_FIELDS = ("banking", "insurance", "chemistry", "medicine", "shipping", "publishing",
           "aviation", "robotics", "software", "energy", "education", "furniture", "music",
           "film", "toys", "perfume", "optics", "astronomy", "railways", "fashion",
           "architecture", "archaeology", "agriculture", "mathematics")
_YEARS_BIRTH = tuple(str(y) for y in range(1900, 2000))
_YEARS_TOWN = tuple(str(y) for y in range(1150, 1900))
_YEARS_ORG = tuple(str(y) for y in range(1850, 2000))
_ALIASES = {"football": ["soccer"], "grey": ["gray"], "Mumbai": ["Bombay"],
            "Chinese": ["Mandarin"], "textile": ["textiles"], "railways": ["railway"]}

# ------------------------------------------- per-attribute pool, text and questions
# Each attribute: (pool, statement predicates, question templates). Predicates
# follow a subject ("Velmora Quistan", "She", "The town"); {v} is the value,
# {a} the indefinite article for it. Questions use {n}: the entity's name.
_Spec = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
ATTRIBUTES: dict[str, dict[str, _Spec]] = {
    "person": {
        "birth_city": (_CITIES, ("was born in {v}", "was born in the city of {v}"),
                       ("Where was {n} born?", "In which city was {n} born?")),
        "profession": (_PROFESSIONS, ("works as {a} {v}", "is {a} {v} by profession",
                                      "earns a living as {a} {v}"),
                       ("What is {n}'s profession?", "What does {n} do for a living?",
                        "What job does {n} have?")),
        "instrument": (_INSTRUMENTS, ("plays the {v}", "has played the {v} since childhood"),
                       ("Which instrument does {n} play?", "What instrument does {n} play?")),
        "favourite_colour": (_COLOURS, ("likes the colour {v} best",
                                        "has always preferred the colour {v}"),
                             ("What is {n}'s favourite colour?",
                              "Which colour does {n} like best?")),
        "birth_year": (_YEARS_BIRTH, ("was born in the year {v}", "came into the world in {v}"),
                       ("In which year was {n} born?", "When was {n} born?")),
        "nationality": (_COUNTRIES, ("is a citizen of {v}", "comes from {v}"),
                        ("Which country is {n} a citizen of?", "What country does {n} come from?")),
        "sport": (_SPORTS, ("plays {v} every weekend", "is a keen {v} player"),
                  ("Which sport does {n} play?", "What sport does {n} enjoy?")),
        "language": (_LANGUAGES, ("speaks {v} at home", "is fluent in {v}"),
                     ("Which language does {n} speak?", "What language is {n} fluent in?")),
    },
    "place": {
        "country": (_COUNTRIES, ("is a town in {v}", "lies in {v}", "is located in {v}"),
                    ("In which country is {n}?", "Which country is {n} located in?")),
        "river": (_RIVERS, ("lies on the {v} river", "stands on the banks of the {v}"),
                  ("Which river does {n} lie on?", "On which river is {n}?")),
        "founded_year": (_YEARS_TOWN, ("was founded in {v}", "was first settled in {v}"),
                         ("In which year was {n} founded?", "When was {n} founded?")),
        "main_industry": (_INDUSTRIES, ("is known for its {v} industry",
                                        "lives mainly from its {v} industry"),
                          ("What is the main industry of {n}?",
                           "Which industry is {n} known for?")),
        "sister_city": (_CITIES, ("is twinned with {v}", "has {v} as its sister city"),
                        ("Which city is {n} twinned with?", "What is the sister city of {n}?")),
        "sport": (_SPORTS, ("is crazy about {v}", "has {v} as its most popular sport"),
                  ("Which sport is most popular in {n}?", "What sport is {n} crazy about?")),
    },
    "organisation": {
        "headquarters": (_CITIES, ("has its headquarters in {v}", "is based in {v}"),
                         ("In which city is the {n} based?", "Where is the {n} headquartered?")),
        "founded_year": (_YEARS_ORG, ("was founded in {v}", "was established in {v}"),
                         ("In which year was the {n} founded?", "When was the {n} established?")),
        "field": (_FIELDS, ("works in the field of {v}", "specialises in {v}"),
                  ("What field does the {n} work in?", "What does the {n} specialise in?")),
        "founder_profession": (_PROFESSIONS, ("was started by {a} {v}", "was founded by {a} {v}"),
                               ("What was the profession of the founder of the {n}?",
                                "What did the founder of the {n} do for a living?")),
        "logo_colour": (_COLOURS, ("uses {a} {v} logo", "has {a} {v} logo"),
                        ("What colour is the logo of the {n}?",
                         "Which colour is the {n}'s logo?")),
        "market": (_COUNTRIES, ("sells most of its products in {v}",
                                "does most of its business in {v}"),
                   ("In which country does the {n} do most of its business?",
                    "Where does the {n} sell most of its products?")),
    },
}
_FILLERS = {
    "person": ("{S} is known to friends and neighbours as a quiet and careful person.",
               "{S} enjoys long walks early in the morning before breakfast.",
               "{S} keeps a small garden and reads a great deal in the evenings."),
    "place": ("{S} has narrow streets, old stone houses and a busy market square.",
              "{S} is small but welcomes a large number of visitors every summer.",
              "{S} holds a lively festival at the end of every autumn."),
    "organisation": ("{S} employs a small but loyal staff of about forty people.",
                     "{S} publishes a short report about its work every spring.",
                     "{S} has grown slowly but steadily over the years."),
}
_ORG_SUFFIXES = ("Institute", "Company", "Society", "Foundation", "Guild", "Group",
                 "Academy", "Trust", "Bureau", "Council")

# ------------------------------------------------------------------ names
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_CLUSTERS = ("br", "dr", "gr", "kr", "tr", "st", "th", "qu", "fl", "sk")
_VOWELS = ("a", "e", "i", "o", "u")
_DIPHTHONGS = ("ai", "ei", "au", "ou")
_MID_CODAS = ("n", "r", "l", "s", "m")
_END_CODAS = ("n", "r", "l", "s", "m", "nd", "rk", "st", "th")
_TOWN_ENDINGS = ("hal", "mere", "holm", "vard", "dun", "mark", "stead", "wen")
# Best effort: common words and real names that the combinator could produce.
_BLOCKLIST = frozenset(
    "adam anna bella brandon brenda carla carmen dana dante darla diana dina dora elena "
    "fiona gina gloria greta kara karen kristen laura lena linda lisa lola luna mara maria "
    "marta mona nadia nina nora olga paula petra rita rosa sara sonia stella tina vera "
    "viola boston camden dover dublin fresno lima malta mali milan parma pisa roma sedan "
    "tampa tula verona banana bandana berlin caramel corona dolores gondola lasagna "
    "madonna manor mantra melon pasta patron pizza salami sonata stamina tornado tundra "
    "vodka zebra baron bison donor feral lemon liner motor pedal rumor sonar talon tenor "
    "tumor tutor valor venom visor vital brother kitten salon person arlon banal baste "
    "saver pesto peste ramos nolte liste sezer tesla sofia santo mario pedro bruno carlo "
    "diego marco paolo remus rufus romeo fargo nepal dubai kenzo pablo nemo devon tokyo "
    "solon delta gamma sigma omega taser laser razor rover lever fever seven human lemur "
    "sinus virus bonus torus minus manus lotus nexus miser mister sister baker maker "
    "tender render lender gender madam sedan sudan benin gabon chad gumbo mambo tango "
    "bingo lingo dingo mango pesos tapas salsa sumo kimono karma dogma drama koala".split()
)


_DOUBLED = re.compile(r"(.)\1")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _make_word(rng: random.Random, syllables: int, ending: str = "") -> str:
    """Builds a capitalised word from CV(C) syllables plus an optional ending."""
    parts: list[str] = []
    coda = ""
    for i in range(syllables):
        if i == 0 and rng.random() < 0.15:
            onset = ""
        elif not coda and rng.random() < 0.2:
            onset = rng.choice(_CLUSTERS)
        else:
            onset = rng.choice(_ONSETS)
        vowel = rng.choice(_DIPHTHONGS) if rng.random() < 0.1 else rng.choice(_VOWELS)
        if onset == "qu" and vowel[0] in "ou":
            vowel = rng.choice(("a", "e", "i"))
        if i == syllables - 1 and not ending:
            coda = rng.choice(_END_CODAS) if rng.random() < 0.5 else ""
        else:
            coda = rng.choice(_MID_CODAS) if rng.random() < 0.25 else ""
        parts.append(onset + vowel + coda)
    return ("".join(parts) + ending).capitalize()


class _NameMaker:
    """Draws invented words that are unique across the whole corpus."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()
        values = {v.lower() for spec in ATTRIBUTES.values() for p, _, _ in spec.values() for v in p}
        self._forbidden_parts = sorted(v for v in values if len(v) >= 4 and not v.isdigit())

    def word(self, ending_pool: tuple[str, ...] = ()) -> str:
        for _ in range(10_000):
            ending = self._rng.choice(ending_pool) if ending_pool else ""
            word = _make_word(self._rng, self._rng.choice((2, 2, 3)), ending)
            low = word.lower()
            max_len = 11 if ending else 9
            if not 5 <= len(word) <= max_len or low in self._used or low in _BLOCKLIST:
                continue
            if _DOUBLED.search(low):
                continue
            if any(part in low for part in self._forbidden_parts):
                continue
            self._used.add(low)
            return word
        raise RuntimeError("could not draw a fresh invented name")  # pragma: no cover


# ---------------------------------------------------------------- data types
@dataclass(frozen=True)
class QAPair:
    """One question about one fact of one entity.

    Attributes:
        id: Unique id, ``"<doc_id>-<attribute>"``.
        question: Natural-language question naming the entity.
        answers: Canonical answer first, then natural aliases (if any).
        doc_id: Id of the only document that answers the question.
        entity: The entity's name as written in the question.
        attribute: Attribute key, e.g. ``"birth_city"``.
    """

    id: str
    question: str
    answers: list[str]
    doc_id: str
    entity: str
    attribute: str


@dataclass(frozen=True)
class SyntheticCorpus:
    """Documents plus QA pairs split by entity.

    Attributes:
        documents: One dict per entity with keys ``id``, ``title``, ``text``,
            ``entity`` and ``kind``.
        train: Training QA pairs.
        dev: Development QA pairs.
        test: Test QA pairs.
    """

    documents: list[dict]
    train: list[QAPair] = field(default_factory=list)
    dev: list[QAPair] = field(default_factory=list)
    test: list[QAPair] = field(default_factory=list)

    def split(self, name: str) -> list[QAPair]:
        """Returns the QA pairs of split ``name`` ("train", "dev" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def documents_by_id(self) -> dict[str, dict]:
        """Returns a mapping from document id to document."""
        return {doc["id"]: doc for doc in self.documents}

    def write(self, directory: PathLike) -> None:
        """Writes corpus.jsonl, train.jsonl, dev.jsonl and test.jsonl.

        Args:
            directory: Target folder; created if missing. Files are overwritten.
            Read them back with ``regrad_engine.data`` (``eval_items``, ``meta_examples``).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "corpus.jsonl", self.documents)
        for name in SPLITS:
            write_jsonl(out / f"{name}.jsonl", (asdict(qa) for qa in self.split(name)))


# ---------------------------------------------------------------- generation
def _entity(rng: random.Random, names: _NameMaker, kind: str) -> tuple[str, str, str]:
    """Returns (name, first-mention subject, later subject) for a new entity."""
    if kind == "person":
        name = f"{names.word()} {names.word()}"
        return name, name, rng.choice(("He", "She"))
    if kind == "place":
        name = names.word(_TOWN_ENDINGS if rng.random() < 0.5 else ())
        return name, name, rng.choice(("It", "The town"))
    suffix = rng.choice(_ORG_SUFFIXES)
    name = f"{names.word()} {suffix}"
    return name, f"The {name}", rng.choice(("It", f"The {suffix.lower()}"))


def _answers(attribute: str, value: str) -> list[str]:
    """Canonical value first, then natural aliases ("Danube River", "soccer")."""
    aliases = list(_ALIASES.get(value, []))
    if attribute == "river":
        aliases.append(f"{value} River")
    return [value, *aliases]


def _document(rng: random.Random, kind: str, first: str, later: str,
              facts: list[tuple[str, str]]) -> str:
    """Writes 2-4 plain sentences stating every fact (plus maybe a filler)."""
    specs = ATTRIBUTES[kind]
    clauses = []
    for attribute, value in facts:
        template = rng.choice(specs[attribute][1])
        clauses.append(template.format(v=value, a=_article(value)))
    groups: list[list[str]] = []
    i = 0
    while i < len(clauses):
        size = 2 if i + 1 < len(clauses) and (len(clauses) - i > 3 or rng.random() < 0.5) else 1
        groups.append(clauses[i:i + size])
        i += size
    sentences = []
    for j, group in enumerate(groups):
        subject = first if j == 0 else (later if rng.random() < 0.7 else first)
        sentences.append(f"{subject} {' and '.join(group)}.")
    short = sum(len(sentence.split()) for sentence in sentences) < 25
    if len(sentences) < 4 and (short or rng.random() < 0.5):
        filler = rng.choice(_FILLERS[kind]).format(S=later)
        sentences.insert(rng.randint(1, len(sentences)), filler)
    return " ".join(sentences)


def generate_corpus(num_entities: int = 600, *, seed: int = 0, dev_fraction: float = 0.1,
                    test_fraction: float = 0.2, facts_per_entity: int = 3) -> SyntheticCorpus:
    """Generates a seeded corpus of fictional entities and their QA pairs.

    Kinds are balanced (person, place, organisation in turn, then shuffled).
    Each entity has ``facts_per_entity`` distinct attributes, each stated in its
    document and asked about by exactly one question.

    Args:
        num_entities: Number of entities (= documents).
        seed: Seed of the private ``random.Random``; same seed, same corpus.
        dev_fraction: Share of entities whose questions go to ``dev``.
        test_fraction: Share of entities whose questions go to ``test``.
        facts_per_entity: Facts (and questions) per entity, 1 to 6.

    Returns:
        The corpus; QA pairs of one entity all sit in the same split.

    Raises:
        ValueError: On a non-positive size, bad fractions or too many facts.
    """
    max_facts = min(len(spec) for spec in ATTRIBUTES.values())
    if num_entities < 1:
        raise ValueError("num_entities must be positive")
    if not 1 <= facts_per_entity <= max_facts:
        raise ValueError(f"facts_per_entity must be between 1 and {max_facts}")
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError("dev_fraction and test_fraction must be >= 0 and sum below 1")
    rng = random.Random(seed)
    names = _NameMaker(rng)
    kinds = [KINDS[i % len(KINDS)] for i in range(num_entities)]
    rng.shuffle(kinds)
    documents: list[dict] = []
    qa_by_doc: list[list[QAPair]] = []
    for index, kind in enumerate(kinds):
        doc_id = f"doc-{index:05d}"
        name, first, later = _entity(rng, names, kind)
        specs = ATTRIBUTES[kind]
        attributes = rng.sample(sorted(specs), facts_per_entity)
        facts = [(attr, rng.choice(specs[attr][0])) for attr in attributes]
        text = _document(rng, kind, first, later, facts)
        documents.append({"id": doc_id, "title": name, "text": text, "entity": name, "kind": kind})
        qa_by_doc.append([
            QAPair(id=f"{doc_id}-{attr}",
                   question=rng.choice(specs[attr][2]).format(n=name),
                   answers=_answers(attr, value),
                   doc_id=doc_id, entity=name, attribute=attr)
            for attr, value in facts
        ])
    order = list(range(num_entities))
    rng.shuffle(order)
    n_test = round(num_entities * test_fraction)
    n_dev = round(num_entities * dev_fraction)
    test_idx = set(order[:n_test])
    dev_idx = set(order[n_test:n_test + n_dev])
    splits: dict[str, list[QAPair]] = {name: [] for name in SPLITS}
    for index, qas in enumerate(qa_by_doc):
        name = "test" if index in test_idx else "dev" if index in dev_idx else "train"
        splits[name].extend(qas)
    return SyntheticCorpus(documents=documents, **splits)
