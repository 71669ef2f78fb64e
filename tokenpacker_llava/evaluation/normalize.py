"""Answer normalization and parsing shared by the scorers.

* ``normalize_vqa_answer``: the official VQA evaluation's processing of a predicted answer
  (``vqaEval.py``: punctuation, the digit-period rule, number words -> digits, articles dropped,
  contractions table) and ``process_punctuation`` for ground-truth answers.
* ``normalize_evalai_answer``: EvalAI's answer processor (the same steps after lower-casing and
  dropping commas and question marks), used by TextVQA's evaluation for predictions and
  ground truth alike.
* ``vqa_soft_accuracy``: ``min(#matching annotators / 3, 1)`` averaged over the subsets that
  leave out one of the annotators, as the official evaluation computes it.
* ``parse_yes_no`` (POPE, as LLaVA's ``eval_pope.py``), ``parse_mme_answer`` (MME's
  ``calculation.py``) and ``parse_option_letter`` (MMBench / ScienceQA).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# The official VQA evaluation's tables (GT-Vision-Lab/VQA, vqaEval.py).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# A period not followed by a digit is dropped ("2." -> "2", "2.5" stays). The official pattern
# writes the intended look-behind as "(?!<=\d)", a look-ahead that never fails, so only the
# "not followed by a digit" half is in force; it is kept verbatim, as is its call, which passes
# re.UNICODE (= 32) as the replacement count.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark next to a space (or any mark, when the text has a
    digit-comma-digit) is deleted, otherwise replaced by a space; then the period rule."""
    out = text
    strip_all = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if strip_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """A predicted answer as the official VQA evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_evalai_answer(text: str) -> str:
    """EvalAI's answer processor (TextVQA; predictions and ground truth alike)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(#other annotators giving prediction / 3, 1)`` averaged over leaving out each annotator
    (10 choose 9 subsets for VQA's 10 answers). Both sides must already be normalized."""
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    matches = sum(1 for answer in answers if answer == prediction)
    total = 0.0
    for answer in answers:
        others = matches - (1 if answer == prediction else 0)
        total += min(1.0, others / 3)
    return total / len(answers)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One VQAv2 question scored exactly as ``vqaEval.py`` does: the prediction fully normalized;
    the ground-truth answers stripped, and punctuation-processed when the annotators disagree."""
    answers = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return vqa_soft_accuracy(normalize_vqa_answer(prediction), answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One TextVQA question as its (EvalAI / m4c) evaluator scores it."""
    return vqa_soft_accuracy(
        normalize_evalai_answer(prediction), [normalize_evalai_answer(a) for a in answers]
    )


def normalize_gqa_answer(text: str) -> str:
    """GQA compares exact strings; LLaVA's conversion lower-cases and drops trailing periods."""
    return " ".join(text.strip().rstrip(".").lower().split())


def parse_yes_no(text: str) -> str:
    """POPE's reading of a free-text answer (LLaVA ``eval_pope.py``): only the first sentence, commas
    removed; "no" if it holds the word "No", "no" or "not", otherwise "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_mme_answer(text: str) -> str:
    """MME's ``parse_pred_ans`` on the lower-cased answer: "yes"/"no" if it is exactly that or its
    first four characters contain it ("yes" first), otherwise "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


OPTION_LETTERS = string.ascii_uppercase
_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\]]|\s|$)")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b")
_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")


def parse_option_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer picks among ``options`` (A, B, ... in order), or None.

    In order: a letter opening the answer (``B``, ``B.``, ``(B)``, ``B) cat``; LLaVA's ScienceQA
    rules), ``The answer is B`` / ``Answer: B``, a single valid letter standing alone among the
    words (VLMEvalKit's rule), and finally the text of exactly one option appearing in the answer.
    """
    letters = OPTION_LETTERS[: len(options)]
    text = text.strip()
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    said = set(_ANSWER_IS.findall(text)) & set(letters)
    if len(said) == 1:
        return said.pop()
    standalone = {word for word in _SEPARATORS.sub(" ", text).split() if word in letters}
    if len(standalone) == 1:
        return standalone.pop()
    lowered = text.lower()
    named = [
        letter
        for letter, option in zip(letters, options, strict=True)
        if option.strip() and option.strip().lower() in lowered
    ]
    return named[0] if len(named) == 1 else None
