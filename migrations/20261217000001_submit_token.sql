-- The submit a run's doubt is about. Every write that records `submitting`
-- before a submit is sent (`submit_started`, `resubmit_started`) stores a
-- token of its own here, next to `submit_in_doubt_since`. The worker that
-- sent that submit names it by this token when it records what became of
-- it after another worker took the run over (its liveness session was cut
-- while the request was in flight): an accepted answer that arrives late is
-- applied to the run as long as the run is still waiting for exactly this
-- submit's outcome, and a submit that was never sent is cleared. Upgrade-safe
-- like 20261202000001: one nullable column, a short lock_timeout.
SET LOCAL lock_timeout = '500ms';

ALTER TABLE wfq.runs ADD COLUMN IF NOT EXISTS submit_token uuid;

COMMENT ON COLUMN wfq.runs.submit_token IS
    'token of the last submit recorded as about to be sent (set with submit_in_doubt_since); names that submit when its answer is recorded late';
