"""Real speech from libespeak-ng (through ctypes), with phoneme timing from espeak-ng's own phoneme events.

espeak-ng is initialised with espeakINITIALIZE_PHONEME_EVENTS in synchronous mode; the synth callback receives
the audio and, for every phoneme, an event carrying its mnemonic and the output sample where it starts. A
phoneme ends where the next event starts. Audio is resampled from espeak's 22050 Hz to 16 kHz.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pickle
import threading
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from avatar.data.visemes import PhonemeSpan

SAMPLE_RATE = 16000
LIBRARY_NAMES = ("libespeak-ng.so.1", "libespeak-ng.so")

_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice setting: `name` like "en-us+f3", rate in words/min, pitch and range 0-100."""

    name: str
    rate: int = 170
    pitch: int = 50
    range: int = 50


@dataclass
class Utterance:
    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    phonemes: list[PhonemeSpan]


class EspeakEngine:
    """Wrapper around libespeak-ng.

    espeak-ng keeps synthesis state (filters, phase, libc rand) between calls, so the same text can come out a
    few samples different on a second call. For byte-exact reproducibility every utterance is synthesised in a
    forked child process that initialises the library from scratch; the child sends audio and events back
    through a pipe. This costs a few milliseconds per utterance.
    """

    _instance: "EspeakEngine | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        lib = None
        for name in LIBRARY_NAMES + tuple(filter(None, [ctypes.util.find_library("espeak-ng")])):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise RuntimeError("libespeak-ng not found; install the Debian package libespeak-ng1")
        self._lib = lib
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"))

    @classmethod
    def get(cls) -> "EspeakEngine":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _synthesize_here(self, text: str, voice: Voice) -> tuple[int, bytes, list[tuple[str, int]], str]:
        """Runs in the child: returns (native rate, int16 audio bytes, phoneme events, error)."""
        lib = self._lib
        native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        if native_rate <= 0:
            return 0, b"", [], "espeak_Initialize failed"
        chunks: list[bytes] = []
        events: list[tuple[str, int]] = []

        def on_synth(wav, num_samples, event_list) -> int:
            if num_samples > 0:
                chunks.append(ctypes.string_at(wav, num_samples * 2))
            i = 0
            while event_list[i].type != _EVENT_LIST_TERMINATED:
                event = event_list[i]
                if event.type == _EVENT_PHONEME:
                    events.append((event.id.string.decode("ascii", "replace"), int(event.sample)))
                i += 1
            return 0

        callback = _Callback(on_synth)
        lib.espeak_SetSynthCallback(callback)
        if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            return 0, b"", [], f"unknown espeak-ng voice {voice.name!r}"
        for param, value in ((_PARAM_RATE, voice.rate), (_PARAM_PITCH, voice.pitch),
                             (_PARAM_RANGE, voice.range), (_PARAM_VOLUME, 100)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._libc.srand(int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little"))
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None)
        lib.espeak_Synchronize()
        if status != 0:
            return 0, b"", [], f"espeak_Synth failed with status {status}"
        return native_rate, b"".join(chunks), events, ""

    def _synthesize_in_child(self, text: str, voice: Voice) -> tuple[int, bytes, list[tuple[str, int]], str]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(read_fd)
                payload = pickle.dumps(self._synthesize_here(text, voice))
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(payload)
            except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not payload:
            raise RuntimeError(f"espeak-ng child process failed (status {status})")
        return pickle.loads(payload)

    def synthesize(self, text: str, voice: Voice) -> Utterance:
        """Speak `text`; returns 16 kHz audio and phoneme spans (seconds from the start of the audio)."""
        with self._lock:
            native_rate, pcm, events, error = self._synthesize_in_child(text, voice)
        if error:
            raise ValueError(error)
        native = np.frombuffer(pcm, dtype=np.int16)
        audio = resample_poly(native.astype(np.float32) / 32768.0, SAMPLE_RATE, native_rate).astype(np.float32)
        duration = len(audio) / SAMPLE_RATE
        spans: list[PhonemeSpan] = []
        for k, (name, sample) in enumerate(events):
            if name == ";" or not name.strip():
                continue  # a modifier of the previous phoneme, not a sound of its own
            start = sample / native_rate
            end = events[k + 1][1] / native_rate if k + 1 < len(events) else duration
            if spans and spans[-1].end > start:
                spans[-1] = PhonemeSpan(spans[-1].name, spans[-1].start, start)
            spans.append(PhonemeSpan(name, start, max(end, start)))
        spans = [s for s in spans if s.end - s.start > 1e-4]
        return Utterance(audio=audio, phonemes=spans)


# ---- voices and sentences ---------------------------------------------------------------------------------------

LANGUAGES = ("en", "en-us", "en-gb-scotland", "de", "fr", "es", "it", "pt", "nl")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+klatt", "+croak")


def sample_voice(rng: np.random.Generator, language: str) -> Voice:
    variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
    return Voice(name=language + variant, rate=int(rng.integers(120, 250)), pitch=int(rng.integers(15, 85)),
                 range=int(rng.integers(15, 90)))


_EN = {
    "subject": ["the old sailor", "my neighbour", "a small boy", "the quiet teacher", "our friend Maria",
                "the baker", "a tired pilot", "my grandmother", "the young doctor", "every musician", "the farmer",
                "a curious cat", "the mayor", "her brother", "the painter", "nobody", "the driver", "a stranger"],
    "verb": ["found", "painted", "carried", "remembered", "borrowed", "opened", "bought", "watched", "mended",
             "forgot", "pushed", "described", "moved", "sold", "dropped", "wanted", "cooked", "measured"],
    "object": ["a blue umbrella", "the broken window", "seven yellow apples", "the map of the moon",
               "a wooden boat", "her favourite book", "a bowl of warm soup", "the piano", "an old bicycle",
               "the morning paper", "a bag of marbles", "two paper lanterns", "the heavy box", "a purple balloon"],
    "tail": ["yesterday", "in the garden", "before dawn", "on Monday", "by the river", "without a word",
             "at the market", "after lunch", "in the rain", "for fun", "very slowly", "near the bridge", ""],
    "question": ["why did", "when did", "how often did", "where did"],
}

_OTHER = {
    "de": (["der alte Mann", "meine Mutter", "ein kleines Kind", "die Lehrerin", "unser Nachbar", "der Koch"],
           ["kauft", "sieht", "malt", "bringt", "sucht", "findet"],
           ["ein rotes Auto", "den blauen Ball", "eine warme Suppe", "das alte Buch", "viele Blumen"],
           ["heute", "am Morgen", "im Garten", "sehr langsam", ""]),
    "fr": (["le vieux marin", "ma voisine", "un petit garçon", "la boulangère", "notre ami", "le peintre"],
           ["achète", "regarde", "porte", "cherche", "trouve", "dessine"],
           ["une pomme rouge", "le bateau bleu", "un grand livre", "la vieille maison", "des fleurs"],
           ["ce matin", "au marché", "dans le jardin", "sans bruit", ""]),
    "es": (["el viejo pescador", "mi abuela", "un niño pequeño", "la maestra", "nuestro vecino", "el panadero"],
           ["compra", "mira", "lleva", "busca", "encuentra", "pinta"],
           ["una manzana roja", "el barco azul", "un libro grande", "la casa vieja", "muchas flores"],
           ["esta mañana", "en el mercado", "en el jardín", "muy despacio", ""]),
    "it": (["il vecchio marinaio", "mia nonna", "un bambino", "la maestra", "il nostro vicino", "il fornaio"],
           ["compra", "guarda", "porta", "cerca", "trova", "dipinge"],
           ["una mela rossa", "la barca blu", "un grande libro", "la casa vecchia", "molti fiori"],
           ["stamattina", "al mercato", "nel giardino", "piano piano", ""]),
    "pt": (["o velho marinheiro", "a minha avó", "um menino", "a professora", "o nosso vizinho", "o padeiro"],
           ["compra", "olha", "leva", "procura", "encontra", "pinta"],
           ["uma maçã vermelha", "o barco azul", "um livro grande", "a casa velha", "muitas flores"],
           ["hoje de manhã", "no mercado", "no jardim", "devagar", ""]),
    "nl": (["de oude zeeman", "mijn oma", "een klein kind", "de juf", "onze buurman", "de bakker"],
           ["koopt", "ziet", "draagt", "zoekt", "vindt", "schildert"],
           ["een rode appel", "de blauwe boot", "een dik boek", "het oude huis", "veel bloemen"],
           ["vandaag", "op de markt", "in de tuin", "heel langzaam", ""]),
}


def base_language(language: str) -> str:
    return "en" if language.startswith("en") else language


def make_sentence(rng: np.random.Generator, language: str) -> str:
    """A random grammatical sentence in `language` from small templates (a large combinatorial space)."""
    lang = base_language(language)
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    if lang == "en":
        s, v, o, t = pick(_EN["subject"]), pick(_EN["verb"]), pick(_EN["object"]), pick(_EN["tail"])
        form = rng.random()
        if form < 0.15:
            text = f"{pick(_EN['question'])} {s} see {o} {t}".strip() + "?"
        elif form < 0.3:
            text = f"{s} {v} {o}, and then {pick(_EN['subject'])} {pick(_EN['verb'])} {pick(_EN['object'])}."
        elif form < 0.4:
            text = f"Oh! {s[0].upper() + s[1:]} {v} {o} {t}".strip() + "!"
        else:
            text = f"{s} {v} {o} {t}".strip() + "."
    else:
        subjects, verbs, objects, tails = _OTHER[lang]
        text = f"{pick(subjects)} {pick(verbs)} {pick(objects)} {pick(tails)}".strip() + "."
    return text[0].upper() + text[1:]


def is_heldout_sentence(text: str) -> bool:
    """The fixed held-out sentence split: one sentence in eight, by a hash of its text (independent of seeds)."""
    return hashlib.sha256(text.strip().lower().encode()).digest()[0] % 8 == 0


def sentence_for_split(rng: np.random.Generator, language: str, heldout: bool) -> str:
    while True:
        text = make_sentence(rng, language)
        if is_heldout_sentence(text) == heldout:
            return text
