"""Incremental detokenization: the streamed text is the one-shot decode, also when byte pieces do not form valid
UTF-8 (random models emit them), and a random model's sampled output never breaks the engine."""
import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import QWEN3_TOKENIZER, STORIES, all_blocks_free, random_prompts


def _tokenizer(name):
    path = {"stories260K": STORIES, "qwen3": QWEN3_TOKENIZER}[name]
    if not path.exists():
        pytest.skip(f"{path} is not here")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


WORDS = ["Once", "upon", "a", "time", "café", "naïve", "你好", "世界", "😀", "🚀", "Straße", "ça", "va", "?", "\n",
         "  ", "tab\t", "x", "Ωμέγα", "ありがとう", "1234"]


def _incremental(tokenizer, prompt, output):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[],
                                   include_stop_str_in_output=False)
    for token in output:
        before = detok.text
        detok.append(token)
        assert detok.text.startswith(before)  # streamed text only grows
    return detok.text


@pytest.mark.parametrize("name", ["stories260K", "qwen3"])
def test_incremental_text_equals_one_shot_decode(name):
    """Valid text (multi-byte characters split over byte pieces and merges) comes out exactly as a one-shot decode
    of the same tokens after the same prompt context."""
    tokenizer = _tokenizer(name)
    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))),
                               add_special_tokens=False)
        if len(ids) < 2:
            continue
        cut = rng.randint(1, len(ids) - 1)
        prompt, output = ids[:cut], ids[cut:]
        context = prompt[-6:]
        if "\ufffd" in tokenizer.decode(context):
            continue  # a prompt that ends inside a character (never one tokenized from text)
        head = tokenizer.decode(context)
        expected = tokenizer.decode(context + output)[len(head):]
        assert _incremental(tokenizer, prompt, output) == expected
        # Cut anywhere (perhaps inside a character): at the end the bytes still waiting show as U+FFFD. (A one-shot
        # byte-fallback decode replaces every byte of a run that ends broken, also whole characters before it, so
        # it is the reference only where nothing is broken.)
        cut_output = output[:rng.randint(1, len(output))]
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[],
                                       include_stop_str_in_output=False)
        for token in cut_output:
            detok.append(token)
        final, one_shot = detok.visible_text(finished=True), tokenizer.decode(context + cut_output)[len(head):]
        assert final.startswith(detok.text) and (final == detok.text or final.endswith("\ufffd"))
        assert final == one_shot or ("\ufffd" in one_shot and final.endswith("\ufffd"))
        checked += 1
    assert checked > 80


@pytest.mark.parametrize("name", ["stories260K", "qwen3"])
def test_invalid_utf8_pieces_never_raise(name):
    """Random token ids (a random model's output) form invalid UTF-8 often: the text still only grows, each
    broken character shows as U+FFFD, and valid stretches come through."""
    tokenizer = _tokenizer(name)
    rng = random.Random(1)
    vocab = len(tokenizer)
    broken = 0
    for _ in range(200):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 10))]
        output = [rng.randrange(3, 300 if rng.random() < 0.5 else vocab) for _ in range(rng.randint(1, 40))]
        text = _incremental(tokenizer, prompt, output)
        broken += "\ufffd" in text
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[],
                                       include_stop_str_in_output=False)
        for token in output:
            detok.append(token)
        final = detok.visible_text(finished=True)
        assert final.startswith(text) and (final == text or final.endswith("\ufffd"))  # the end flushes broken bytes
        if "\ufffd" not in tokenizer.decode(prompt[-6:] + output):
            context = prompt[-6:]
            assert text == tokenizer.decode(context + output)[len(tokenizer.decode(context)):]
    assert broken > 20  # the case this test is for did happen


def test_random_model_sampling_never_breaks_the_engine(tiny_models):
    if not STORIES.exists():
        pytest.skip("needs stories260K's tokenizer")
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(8, seed=70)]
    outputs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=1, max_tokens=60, ignore_eos=True),
                           use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 60
        assert completion.text  # byte garbage shows as text (U+FFFD where it is broken), never as an error
    assert all_blocks_free(llm)
