"""Seeded English sentence generator for the demo corpus: grammar templates over word lists.

The vocabulary (about 2,400 word forms, including plurals, verb inflections, possessives and
contractions; the demo preset uses about 2,100 of them) is large enough that a recogniser has
to learn how letters sound rather than memorise sentences. The templates keep sentences short
(3-10 words, mostly 4-7) and grammatical, so a language model trained on the transcripts has
structure to learn. Every word list below is lowercase; sentences come out uppercase as in
LibriSpeech.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

# ------------------------------------------------------------------------------- nouns
# Singular forms; plurals are derived by rule, with the irregular ones listed further down.
_PEOPLE = """
man woman child boy girl friend teacher doctor farmer sailor soldier captain king queen prince
princess baker driver pilot writer painter singer dancer hunter fisherman student neighbour
stranger visitor traveller merchant shepherd nurse judge lawyer officer guard servant master
mother father sister brother uncle aunt cousin daughter son wife husband baby grandmother
grandfather lady gentleman priest poet artist scientist engineer clerk tailor miner carpenter
cook waiter banker pirate knight wizard giant butcher blacksmith gardener musician actor player
coach chief mayor professor pupil tourist guest host owner keeper postman policeman fireman
messenger reporter author builder rider hero thief beggar orphan widow bride passenger prisoner
duke
"""
_ANIMALS = """
dog cat horse cow sheep goat pig bird duck goose hen fox wolf bear lion tiger rabbit mouse rat
deer eagle owl crow swan frog snake fish whale dolphin shark monkey elephant camel donkey
squirrel beaver badger otter turtle bee spider butterfly beetle pony kitten puppy lamb calf
bull ox zebra giraffe hawk parrot robin penguin seal snail worm ant lizard tortoise bat chicken
turkey kangaroo
"""
_THINGS = """
book letter pen paper table chair bed door window wall roof floor room house home cottage
castle tower bridge road street path garden field forest river lake sea ocean island mountain
hill valley village town city market shop school church station harbour ship boat train car bus
wagon carriage bicycle wheel engine machine clock watch lamp candle fire stove oven kettle pot
pan cup plate bowl spoon knife fork basket box bag trunk coat hat shoe boot glove scarf dress
shirt ribbon button ring necklace coin purse key lock rope chain ladder hammer nail bucket
barrel bottle jar blanket pillow curtain carpet mirror picture painting map flag drum bell
violin piano guitar whistle song story poem message secret question answer promise dream idea
plan reason problem lesson rule game puzzle gift prize ticket newspaper stamp apple orange
lemon pear plum cherry grape melon potato carrot onion bean cabbage tomato loaf cake pie egg
flower rose tulip daisy tree oak pine willow leaf branch root seed bush hedge stone rock storm
cloud sky sun moon star planet shadow rainbow morning afternoon evening night day week month
year summer winter spring autumn hour minute moment season colour sound voice noise word name
number line circle square corner edge side top bottom middle front kitchen attic stable barn
fence gate well pond stream meadow orchard desert jungle cave shore beach cliff wave lighthouse
camp tent library museum theatre hospital prison palace temple farm office bank inn hall
journey adventure holiday party wedding birthday festival meeting memory mistake warning
treasure fortune danger
"""
# Nouns without a plural here: they take "the", "some", possessives, never "a" or a number.
_MASS = """
water milk tea coffee juice honey sugar salt flour rice corn wheat bread butter cheese soup
stew jam chocolate bacon ham pudding sand mud dust clay snow ice frost rain thunder lightning
fog mist grass moss light music silence courage wisdom laughter luck news advice furniture
"""
_PLACES = """
london paris rome berlin madrid vienna dublin boston chicago denver seattle houston toronto
sydney cairo lisbon oslo prague athens geneva venice naples florence chester oxford cambridge
bristol york glasgow edinburgh cardiff belfast dover brighton bath moscow warsaw budapest
munich hamburg milan zurich amsterdam brussels stockholm helsinki copenhagen montreal vancouver
dallas atlanta detroit phoenix portland memphis nashville miami canada mexico brazil peru
chile egypt india china japan france spain italy greece norway sweden denmark holland belgium
austria poland russia turkey scotland ireland wales england africa europe asia america
australia kenya nigeria morocco argentina colombia iceland finland portugal hungary
"""
_NAMES = """
john mary james anna robert elizabeth william margaret thomas susan charles helen george alice
henry emma edward grace arthur lucy peter clara david richard jane michael kate daniel laura
samuel ellen joseph martha walter sarah albert nora harold ruth oliver emily victor irene hugo
stella felix agnes oscar mabel simon edith philip dora martin flora molly tom betty harry nancy
ben polly fred sally andrew catherine benjamin charlotte christopher dorothy eleanor francis
gregory hannah isaac jacob leonard lillian matthew nathan patrick rachel raymond rebecca
stephen theodore vincent abigail barbara cecilia diana eugene florence gilbert howard ivan
jasper lionel maria norman olga percy quentin rupert sophia timothy ursula vera wallace
yvonne zachary
"""
_ADJECTIVES = """
big small large little tall short long wide narrow deep shallow high low heavy light old young
new ancient modern fresh ripe green red blue yellow white black brown grey purple pink golden
silver dark bright pale clear cloudy sunny rainy windy foggy snowy stormy cold warm hot cool
dry wet damp soft hard smooth rough sharp dull blunt quiet loud silent noisy happy sad angry
calm brave afraid proud humble kind cruel gentle wild tame clever foolish wise silly strange
famous rich poor busy lazy eager tired sleepy hungry thirsty empty full clean dirty early late
quick slow swift sweet bitter sour salty spicy strong weak honest careful careless lucky lonely
friendly polite rude curious patient simple plain fancy pretty ugly beautiful handsome lovely
terrible wonderful pleasant useful useless precious cheap expensive secret hidden broken open
closed round flat steep distant nearby northern southern eastern western royal wooden iron
cotton woollen leather shiny dusty muddy sandy rocky grassy hilly leafy frozen crowded thick
thin fat slim huge tiny enormous faint fierce cheerful gloomy merry nervous anxious worried
excited bored puzzled surprised delighted grateful generous greedy selfish tidy messy neat
crooked straight elderly rusty magic mysterious marvellous ordinary unusual rare common
familiar foreign local hollow solid fragile sturdy loyal faithful stubborn timid shy bold
daring fearless helpless harmless dangerous safe wicked noble icy slippery sticky tasty
delicious sick healthy
"""
_ADVERBS = """
quickly slowly quietly loudly softly gently carefully suddenly finally happily sadly angrily
calmly bravely easily nearly really truly simply badly proudly politely patiently eagerly
early late often always never sometimes seldom rarely usually again once twice today tonight
tomorrow yesterday soon already still together alone outside inside upstairs downstairs
nearby abroad here there everywhere somewhere perhaps certainly surely cheerfully kindly
warmly wisely foolishly secretly silently swiftly boldly gladly sweetly brightly tightly
firmly neatly lazily busily noisily hungrily
"""
# Verbs as ``base`` or ``base:past`` (irregular past); other forms are derived by rule.
_VERBS_TRANSITIVE = """
see:saw find:found take:took bring:brought buy:bought sell:sold hold:held keep:kept leave:left
make:made give:gave carry open close paint build:built write:wrote read:read draw:drew
catch:caught throw:threw lose:lost hide:hid steal:stole follow watch visit clean wash fill push
pull lift drop move mend fix pack cook bake borrow lend:lent send:sent cut:cut break:broke
choose:chose forget:forgot remember answer ask call help love like want need hate miss count
guard greet thank invite protect chase feed:fed meet:met teach:taught tell:told show
drive:drove ride:rode hear:heard touch kick hit:hit grab hug kiss pick collect gather deliver
fetch drag burn boil fry pour taste wrap tie fold dig:dug plant cross describe explain discover
notice admire respect trust blame forgive:forgave warn save rescue attack defend repair replace
prepare order offer receive accept refuse obey join enter reach pass share beat:beat win:won
lead:led bite:bit shake:shook wake:woke spend:spent bend:bent shoot:shot wear:wore marry
"""
_VERBS_INTRANSITIVE = """
walk run:ran sleep:slept smile laugh cry sing:sang dance swim:swam jump climb wait listen rest
work play travel arrive return shout whisper sit:sat stand:stood fall:fell fly:flew grow:grew
shine:shone wander hurry stay rise:rose tremble sigh weep:wept march scream vanish appear
disappear begin:began wonder float sink:sank sail swing:swung fade roar bloom pause relax
breathe
"""
_UNITS = "one two three four five six seven eight nine".split()
_TEENS = """ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen
nineteen""".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_BIG = ["hundred", "thousand"]

# Multi-syllable verbs that double their final consonant (one-syllable ones do by rule).
_DOUBLING = {"forget", "begin", "admit", "permit", "regret", "prefer", "occur", "refer"}
_IRREGULAR_PLURALS = {
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "ox": "oxen",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "wife": "wives",
    "loaf": "loaves",
    "calf": "calves",
    "thief": "thieves",
    "scarf": "scarves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "hero": "heroes",
    "lady": "ladies",
}

# ------------------------------------------------------------------------ function words
DETERMINERS = ["the", "a", "this", "that", "my", "your", "his", "her", "our", "their", "every"]
MASS_DETERMINERS = ["the", "some", "this", "that", "my", "your", "his", "her", "our", "their"]
PLURAL_DETERMINERS = ["the", "some", "these", "those", "many", "few", "all", "my", "our"]
PREPOSITIONS = """in on under near behind beside across through over into from with without
along around below above""".split()
PLACE_PREPOSITIONS = ["in", "to", "from", "near"]
CONJUNCTIONS = ["and", "but", "so", "because", "while", "when", "until", "although"]
PRONOUNS = ["i", "you", "we", "they", "he", "she", "it"]
WH_WORDS = ["where", "why", "when", "how"]
MODALS = ["will", "can", "should", "would", "could", "must", "might"]
NEGATIVE_MODALS = ["didn't", "can't", "won't", "couldn't", "wouldn't", "shouldn't"]
SPEECH_VERBS = ["said", "thought", "knew", "felt", "heard"]
LINKING_VERBS = ["was", "looked", "seemed", "is", "looks", "seems"]
DEGREE_WORDS = ["very", "quite", "rather", "too", "so"]
OTHER_WORDS = """an and a to did was were is am are isn't wasn't weren't doesn't don't it's
there please not""".split()


def _words(block: str) -> list[str]:
    return list(dict.fromkeys(block.split()))


def _syllables(word: str) -> int:
    return len(re.findall(r"[aeiouy]+", word))


def _doubles(base: str) -> bool:
    """Whether the final consonant doubles before -ed / -ing (stop -> stopped)."""
    if not re.search(r"[^aeiou][aeiou][bdglmnprt]$", base):
        return False
    return base in _DOUBLING or _syllables(base) == 1


def plural(noun: str) -> str:
    """English plural of a (countable) noun."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith("man"):
        return noun[:-3] + "men"
    if re.search(r"(s|x|z|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def verb_forms(entry: str) -> dict[str, str]:
    """``{"base", "s", "ed", "ing"}`` of a ``base[:past]`` entry."""
    base, _, past = entry.partition(":")
    if re.search(r"(s|x|z|ch|sh|o)$", base):
        third = base + "es"
    elif re.search(r"[^aeiou]y$", base):
        third = base[:-1] + "ies"
    else:
        third = base + "s"
    if not past:
        if base.endswith("e"):
            past = base + "d"
        elif re.search(r"[^aeiou]y$", base):
            past = base[:-1] + "ied"
        elif _doubles(base):
            past = base + base[-1] + "ed"
        else:
            past = base + "ed"
    if base.endswith("ie"):
        ing = base[:-2] + "ying"
    elif base.endswith("e") and not base.endswith(("ee", "ye", "oe")):
        ing = base[:-1] + "ing"
    elif _doubles(base):
        ing = base + base[-1] + "ing"
    else:
        ing = base + "ing"
    return {"base": base, "s": third, "ed": past, "ing": ing}


def _verbs(block: str) -> list[dict[str, str]]:
    return [verb_forms(entry) for entry in _words(block)]


PEOPLE = _words(_PEOPLE)
ANIMATE = PEOPLE + [w for w in _words(_ANIMALS) if w not in PEOPLE]
COUNTABLE = ANIMATE + [w for w in _words(_THINGS) if w not in ANIMATE]
MASS = [w for w in _words(_MASS) if w not in COUNTABLE]
PLACES = _words(_PLACES)
NAMES = _words(_NAMES)
ADJECTIVES = _words(_ADJECTIVES)
ADVERBS = _words(_ADVERBS)
TRANSITIVE = _verbs(_VERBS_TRANSITIVE)
INTRANSITIVE = _verbs(_VERBS_INTRANSITIVE)
NUMBER_WORDS = _UNITS + _TEENS + _TENS + _BIG


def article(word: str) -> str:
    """'a' or 'an' before ``word`` (by sound for the few exceptions in the lists)."""
    if word.startswith(("hour", "honest", "heir")):
        return "an"
    if word.startswith(("use", "uni", "usu", "eu", "one")):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


class SentenceGenerator:
    """Draws sentences from the grammar with a private ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # (template, weight): short templates are drawn more often to keep utterances brief.
        table: list[tuple[Callable[[], list[str]], int]] = [
            (self._transitive, 5),
            (self._intransitive, 4),
            (self._progressive, 3),
            (self._question, 2),
            (self._with_place, 2),
            (self._with_number, 2),
            (self._compound, 1),
            (self._reported, 1),
            (self._possessive, 3),
            (self._negative, 2),
            (self._modal, 2),
            (self._there_is, 2),
            (self._imperative, 2),
            (self._description, 3),
        ]
        self.templates = [t for t, _ in table]
        self.weights = [w for _, w in table]

    # small building blocks -------------------------------------------------------------
    def _pick(self, items: list):
        return self.rng.choice(items)

    def _adjectives(self, p_one: float = 0.3, p_two: float = 0.04) -> list[str]:
        r = self.rng.random()
        n = 2 if r < p_two else 1 if r < p_one + p_two else 0
        return [self._pick(ADJECTIVES) for _ in range(n)]

    def _noun_phrase(self, nouns: list[str] | None = None) -> tuple[list[str], bool]:
        """(words, is plural)."""
        r = self.rng.random()
        if nouns is None and r < 0.12:
            return [self._pick(MASS_DETERMINERS), *self._adjectives(0.3), self._pick(MASS)], False
        noun = self._pick(nouns or COUNTABLE)
        if r > 0.72:
            return [self._pick(PLURAL_DETERMINERS), *self._adjectives(), plural(noun)], True
        words = [*self._adjectives(), noun]
        det = self._pick(DETERMINERS)
        return [article(words[0]) if det == "a" else det, *words], False

    def _object(self) -> list[str]:
        return self._noun_phrase()[0]

    def _subject(self) -> tuple[list[str], str]:
        """(words, person): person is "3s" (he/she/it/singular), "1s" (I) or "pl"."""
        r = self.rng.random()
        if r < 0.25:
            return [self._pick(NAMES)], "3s"
        if r < 0.45:
            pron = self._pick(PRONOUNS)
            return [pron], "3s" if pron in {"he", "she", "it"} else "1s" if pron == "i" else "pl"
        phrase, is_plural = self._noun_phrase(ANIMATE)
        return phrase, "pl" if is_plural else "3s"

    def _maybe(self, words: list[str], p: float = 0.3) -> list[str]:
        return words if self.rng.random() < p else []

    def _adverb(self, p: float = 0.3) -> list[str]:
        return self._maybe([self._pick(ADVERBS)], p)

    def _number(self) -> tuple[list[str], bool]:
        """A cardinal number in words, and whether it is more than one."""
        r = self.rng.random()
        if r < 0.1:
            return ["one"], False
        if r < 0.6:
            return [self._pick(_UNITS[1:] + _TEENS)], True
        if r < 0.9:
            tens = self._pick(_TENS)
            return ([tens, self._pick(_UNITS)] if self.rng.random() < 0.6 else [tens]), True
        return [self._pick(_UNITS), self._pick(_BIG)], True

    # templates -------------------------------------------------------------------------
    def _transitive(self) -> list[str]:
        subject, _ = self._subject()
        verb = self._pick(TRANSITIVE)
        return [*subject, verb["ed"], *self._object(), *self._adverb()]

    def _intransitive(self) -> list[str]:
        subject, person = self._subject()
        verb = self._pick(INTRANSITIVE)
        form = verb["ed"] if self.rng.random() < 0.6 else verb["s" if person == "3s" else "base"]
        tail = [self._pick(PREPOSITIONS), *self._object()] if self.rng.random() < 0.5 else []
        return [*subject, form, *self._adverb(0.4), *tail]

    def _progressive(self) -> list[str]:
        subject, person = self._subject()
        if self.rng.random() < 0.5:
            aux = "were" if person == "pl" else "was"
        else:
            aux = {"3s": "is", "1s": "am", "pl": "are"}[person]
        if self.rng.random() < 0.5:
            return [*subject, aux, self._pick(TRANSITIVE)["ing"], *self._object()]
        return [*subject, aux, self._pick(INTRANSITIVE)["ing"], *self._adverb(0.6)]

    def _question(self) -> list[str]:
        aux = self._pick(["did", *MODALS[:-2]])
        subject, _ = self._subject()
        verb = self._pick(TRANSITIVE)
        return [self._pick(WH_WORDS), aux, *subject, verb["base"], *self._object()]

    def _with_place(self) -> list[str]:
        subject, _ = self._subject()
        if self.rng.random() < 0.5:
            middle = [self._pick(TRANSITIVE)["ed"], *self._object()]
        else:
            middle = [self._pick(INTRANSITIVE)["ed"]]
        return [*subject, *middle, self._pick(PLACE_PREPOSITIONS), self._pick(PLACES)]

    def _with_number(self) -> list[str]:
        subject, _ = self._subject()
        number, many = self._number()
        noun = self._pick(COUNTABLE)
        return [
            *subject,
            self._pick(TRANSITIVE)["ed"],
            *number,
            *self._adjectives(0.3, 0.0),
            plural(noun) if many else noun,
        ]

    def _compound(self) -> list[str]:
        first, _ = self._subject()
        second, _ = self._subject()
        v1, v2 = self._pick(INTRANSITIVE), self._pick(INTRANSITIVE)
        return [*first, v1["ed"], self._pick(CONJUNCTIONS), *second, v2["ed"]]

    def _reported(self) -> list[str]:
        noun = self._pick(COUNTABLE)
        return [
            self._pick(NAMES),
            self._pick(SPEECH_VERBS),
            "the",
            noun,
            self._pick(["was", "looked", "seemed"]),
            self._pick(ADJECTIVES),
        ]

    def _possessive(self) -> list[str]:
        noun = self._pick(COUNTABLE)
        words = [self._pick(NAMES) + "'s", *self._adjectives(0.35, 0.0), noun]
        if self.rng.random() < 0.5:
            return [*words, self._pick(INTRANSITIVE)["ed"], *self._adverb(0.5)]
        return [*words, self._pick(LINKING_VERBS[:3]), *self._degree(), self._pick(ADJECTIVES)]

    def _degree(self) -> list[str]:
        return self._maybe([self._pick(DEGREE_WORDS)], 0.3)

    def _negative(self) -> list[str]:
        subject, person = self._subject()
        if self.rng.random() < 0.4:
            aux = "doesn't" if person == "3s" else "don't"
        else:
            aux = self._pick(NEGATIVE_MODALS)
        return [*subject, aux, self._pick(TRANSITIVE)["base"], *self._object()]

    def _modal(self) -> list[str]:
        subject, _ = self._subject()
        if self.rng.random() < 0.6:
            rest = [self._pick(TRANSITIVE)["base"], *self._object()]
        else:
            rest = [self._pick(INTRANSITIVE)["base"], *self._adverb(0.7)]
        return [*subject, self._pick(MODALS), *rest]

    def _there_is(self) -> list[str]:
        r = self.rng.random()
        if r < 0.45:
            number, many = self._number()
            noun = self._pick(COUNTABLE)
            head = [*number, plural(noun) if many else noun]
        elif r < 0.85:
            words, many = [*self._adjectives(), self._pick(COUNTABLE)], False
            head = [article(words[0]), *words]
        else:
            head, many = ["some", *self._adjectives(0.3, 0.0), self._pick(MASS)], False
        if many:
            be = self._pick(["were", "are", "weren't"])
        elif head[0] == "some":
            be = self._pick(["was", "is"])
        else:
            be = self._pick(["was", "is", "wasn't", "isn't"])
        return ["there", be, *head, self._pick(PREPOSITIONS), *self._object()]

    def _imperative(self) -> list[str]:
        please = self._maybe(["please"], 0.3)
        verb = self._pick(TRANSITIVE)["base"]
        tail = self._adverb(0.3) or self._maybe([self._pick(PREPOSITIONS), *self._object()], 0.4)
        return [*please, verb, *self._object(), *tail]

    def _description(self) -> list[str]:
        subject, person = self._subject()
        if person == "1s":
            subject, person = ["it"], "3s"
        r = self.rng.random()
        if r < 0.5:
            verb = "were" if person == "pl" else "was"
        elif r < 0.8:
            verb = "are" if person == "pl" else "is"
        else:
            verb = self._pick(["looked", "seemed"] if person == "pl" else LINKING_VERBS[1:])
        if self.rng.random() < 0.15 and person == "3s" and verb in ("is", "was"):
            verb = "isn't" if verb == "is" else "wasn't"
        return [*subject, verb, *self._degree(), self._pick(ADJECTIVES), *self._adverb(0.2)]

    # public ----------------------------------------------------------------------------
    def sentence(self, min_words: int = 3, max_words: int = 10) -> str:
        """One sentence, uppercase as in LibriSpeech transcripts."""
        while True:
            template = self.rng.choices(self.templates, self.weights)[0]
            words = template()
            if min_words <= len(words) <= max_words:
                return " ".join(words).upper()

    def unique_sentences(
        self, n: int, exclude: set[str] | None = None, max_words: int = 10
    ) -> Iterator[str]:
        """``n`` distinct sentences of at most ``max_words`` words, none of them in ``exclude``."""
        seen = set(exclude or ())
        produced = 0
        while produced < n:
            s = self.sentence(max_words=max_words)
            if s not in seen:
                seen.add(s)
                produced += 1
                yield s


def vocabulary() -> set[str]:
    """Every word form the grammar can produce (uppercase)."""
    words = set(COUNTABLE) | {plural(n) for n in COUNTABLE} | set(MASS) | set(PLACES)
    words |= set(NAMES) | {n + "'s" for n in NAMES}
    words |= set(ADJECTIVES) | set(ADVERBS) | set(NUMBER_WORDS)
    for verb in TRANSITIVE + INTRANSITIVE:
        words |= set(verb.values())
    for group in (
        DETERMINERS,
        MASS_DETERMINERS,
        PLURAL_DETERMINERS,
        PREPOSITIONS,
        PLACE_PREPOSITIONS,
        CONJUNCTIONS,
        PRONOUNS,
        WH_WORDS,
        MODALS,
        NEGATIVE_MODALS,
        SPEECH_VERBS,
        LINKING_VERBS,
        DEGREE_WORDS,
        OTHER_WORDS,
    ):
        words |= set(group)
    return {w.upper() for w in words}
