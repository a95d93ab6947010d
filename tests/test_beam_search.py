"""Beam search equals Hugging Face transformers generate(num_beams=k, do_sample=False); beams share blocks."""
import json
import shutil

import pytest
import torch

from pagedllm import LLM, BeamSearchParams
from tests.conftest import all_blocks_free, random_prompts


def _hf_beams(path, prompt, width, max_tokens, length_penalty):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                         max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    eos = model.generation_config.eos_token_id
    sequences = []
    for row in out.sequences.tolist():
        gen = row[len(prompt):]
        if eos in gen:
            gen = gen[:gen.index(eos) + 1]
        sequences.append(gen)
    return sequences


@pytest.fixture(scope="module")
def eos_model(tiny_llama, tmp_path_factory):
    """The tiny model with a frequent token made its EOS, so that beams end early and length penalties matter."""
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)
    from pagedllm import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(8, seed=30)],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    counts = torch.bincount(torch.tensor([t for o in outs for t in o.outputs[0].token_ids]))
    eos = int(counts.argmax())
    path = tmp_path_factory.mktemp("eos_model") / "model"
    shutil.copytree(tiny_llama, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("width, length_penalty", [(1, 1.0), (2, 1.0), (3, 0.5), (4, 2.0), (4, -1.0)])
def test_beam_search_matches_hf(eos_model, width, length_penalty):
    llm = LLM(str(eos_model), dtype="float32", skip_tokenizer_init=True, block_size=8)
    prompts = random_prompts(3, min_len=4, max_len=20, seed=31 + width)
    params = BeamSearchParams(beam_width=width, max_tokens=10, length_penalty=length_penalty)
    ours = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, ours):
        expected = _hf_beams(eos_model, prompt, width, 10, length_penalty)
        got = [s.tokens[len(prompt):] for s in output.sequences]
        assert got[0] == expected[0]
        assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    if width >= 3 and length_penalty <= 1.0:  # the made-up EOS ends some hypotheses early, so the length penalty decides
        assert any(s.finish_reason == "stop" for o in ours for s in o.sequences)
    assert all_blocks_free(llm)


def test_beams_share_blocks_instead_of_copying(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    prompt = random_prompts(1, min_len=40, max_len=40, seed=40)[0]  # 5 full blocks
    engine = llm.llm_engine
    engine.add_beam_search_request("b", prompt, BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True))
    copies_per_step, max_shared = [], 0
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        copies_per_step.append(len(out.blocks_to_copy))
        return out
    engine.scheduler.schedule = spy
    while engine.has_unfinished_requests():
        engine.step()
        tables = list(engine.kv_cache.block_tables.values())
        if len(tables) == 4:
            max_shared = max(max_shared, sum(1 for b in set(tables[0]) if all(b in t for t in tables)))
    assert max_shared >= 5, "the beams did not share the prompt's blocks"
    # A step copies at most the partially filled last block of each beam, never whole caches.
    assert max(copies_per_step) <= 4 and sum(copies_per_step) > 0
    assert all_blocks_free(llm)


def test_use_beam_search_over_http(eos_model):
    """The completions API's use_beam_search (vLLM's field): n beams come back as n choices, equal to HF's."""
    import openai
    from transformers import AutoTokenizer

    from tests.server_fixtures import ServerThread, need_stories
    need_stories()
    tokenizer = AutoTokenizer.from_pretrained(eos_model)
    server = ServerThread(str(eos_model), dtype="float32", block_size=8)
    try:
        client = server.client()
        model = client.models.list().data[0].id
        prompts = random_prompts(2, min_len=4, max_len=20, seed=60)
        for prompt, width, penalty in ((prompts[0], 3, 1.0), (prompts[1], 2, 0.5)):
            response = client.completions.create(model=model, prompt=prompt, n=width,
                                                 max_tokens=10, extra_body={"use_beam_search": True,
                                                                            "length_penalty": penalty})
            expected = [tokenizer.decode(t, skip_special_tokens=True)
                        for t in _hf_beams(eos_model, prompt, width, 10, penalty)]
            texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
            assert [c.index for c in sorted(response.choices, key=lambda c: c.index)] == list(range(width))
            assert texts[0] == expected[0] and sorted(texts) == sorted(expected)
            assert response.usage.prompt_tokens == len(prompt)
            streamed = {}
            for chunk in client.completions.create(model=model, prompt=prompt, n=width, max_tokens=10, stream=True,
                                                   extra_body={"use_beam_search": True, "length_penalty": penalty}):
                for choice in chunk.choices:
                    streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            assert [streamed[i] for i in range(width)] == texts
        for extra, param in (({"temperature": 0.8}, "temperature"), ({"logprobs": 2}, "logprobs"),
                             ({"stop": ["x"]}, "stop"), ({"length_penalty": "long"}, "length_penalty")):
            body = {"use_beam_search": True, "length_penalty": extra.pop("length_penalty", 1.0)}
            with pytest.raises(openai.BadRequestError) as error:
                client.completions.create(model=model, prompt=prompts[0], n=2, max_tokens=5,
                                          extra_body=body, **extra)
            assert error.value.body["param"] == param
        assert server.wait_idle()
    finally:
        server.stop()
