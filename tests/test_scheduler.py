"""The scheduler and KV-cache manager alone (plain Python, no model): budgets, the order of preemption, the pool."""
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler


def _request(i: int, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(f"r{i}", list(range(3, 3 + prompt_len)), None, arrival_time=float(i), arrival_index=i,
                   max_tokens=max_tokens)


def _step(scheduler: Scheduler):
    """Schedule, then pretend the model ran: every request that reached its length gets one token."""
    out = scheduler.schedule()
    scheduler.update_after_step(out)
    for request in out.requests:
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(7)
    return out


def test_the_latest_arrival_is_preempted_first():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    requests = [_request(i, prompt_len=7) for i in range(3)]  # 2 blocks each: all 6 blocks
    for request in requests:
        scheduler.add_request(request)
    first = _step(scheduler)
    assert [r.request_id for r in first.requests] == ["r0", "r1", "r2"] and kv.pool.num_free_blocks == 0
    _step(scheduler)  # token 8 of each fills its second block
    out = _step(scheduler)  # token 9 needs a third block each: the pool is short
    assert [r.request_id for r in out.preempted] == ["r2"]  # the most recent arrival goes
    assert requests[2].status == RequestStatus.PREEMPTED and requests[2].num_computed_tokens == 0
    assert [r.request_id for r in out.requests] == ["r0", "r1"]
    assert scheduler.waiting[0] is requests[2]  # and comes back first
    assert scheduler.num_preemptions == 1
    # never more blocks in the tables than the pool has
    assert sum(len(t) for t in kv.block_tables.values()) + kv.pool.num_free_blocks == 6


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    early, late = _request(0, prompt_len=4), _request(1, prompt_len=3)
    scheduler.add_request(early)
    scheduler.add_request(late)
    _step(scheduler)  # one block each
    out = _step(scheduler)  # early needs a second block: late is preempted for it
    assert [r.request_id for r in out.preempted] == ["r1"] and [r.request_id for r in out.requests] == ["r0"]
    for _ in range(3):
        _step(scheduler)  # early grows to 8 tokens; late waits (no block for it)
    assert late.status == RequestStatus.PREEMPTED
    scheduler.finish_request(early, RequestStatus.FINISHED_LENGTH)
    out = _step(scheduler)  # its blocks came back: late is admitted again
    assert [r.request_id for r in out.requests] == ["r1"] and late.status == RequestStatus.RUNNING


def test_token_budget_and_max_num_seqs():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(3):
        scheduler.add_request(_request(i, prompt_len=8))
    out = _step(scheduler)
    assert out.num_new_tokens == [8, 2]  # r1's prompt is chunked by the budget; r2 waits for a seat
    assert out.total_tokens == 10 and len(scheduler.running) == 2
    out = _step(scheduler)
    assert [r.request_id for r in out.requests] == ["r0", "r1"] and out.num_new_tokens == [1, 6]
    assert out.num_decodes == 1
