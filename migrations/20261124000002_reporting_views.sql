-- Views for the people who read results with SQL.

-- Money per day, provider profile and workflow. A run counts on the day it
-- was submitted; amounts not known yet count as zero.
CREATE VIEW wfq.daily_costs AS
SELECT date_trunc('day', coalesce(submitted_at, created_at)) AS day,
       provider,
       workflow_id,
       currency,
       count(*)                                  AS runs,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed')    AS failed,
       coalesce(sum(frozen_amount), 0)           AS frozen,
       coalesce(sum(final_amount), 0)            AS final,
       coalesce(sum(released_amount), 0)         AS released,
       coalesce(sum(total_cost), 0)              AS total_cost,
       coalesce(sum(frozen_amount) FILTER (WHERE settled_at IS NULL), 0) AS outstanding_frozen
FROM wfq.runs
WHERE submitted_at IS NOT NULL OR frozen_amount IS NOT NULL
GROUP BY 1, 2, 3, 4;

COMMENT ON VIEW wfq.daily_costs IS 'money per day (of submission), provider profile and workflow';

-- Settled runs whose money does not add up.
CREATE VIEW wfq.settlement_mismatches AS
SELECT id, provider, workflow_id, provider_run_id, state, settlement_status,
       frozen_amount, final_amount, released_amount,
       compute_cost, external_model_cost, total_cost,
       CASE
           WHEN frozen_amount IS DISTINCT FROM final_amount + released_amount
               THEN 'frozen <> final + released'
           ELSE 'total_cost <> compute_cost + external_model_cost'
       END AS problem
FROM wfq.runs
WHERE final_amount IS NOT NULL AND released_amount IS NOT NULL
  AND (frozen_amount IS DISTINCT FROM final_amount + released_amount
       OR (total_cost IS NOT NULL AND compute_cost IS NOT NULL AND external_model_cost IS NOT NULL
           AND total_cost <> compute_cost + external_model_cost));

COMMENT ON VIEW wfq.settlement_mismatches IS 'settled runs where frozen <> final + released or total <> compute + external';

-- Runs that look stuck: running for over an hour since submission, waiting
-- in submitting for over ten minutes, or holding a lease that has expired.
CREATE VIEW wfq.stuck_runs AS
SELECT id, provider, workflow_id, state, attempts, polls, provider_run_id,
       lease_owner, lease_expires_at, due_at, submitted_at, updated_at,
       CASE
           WHEN lease_owner IS NOT NULL AND lease_expires_at < now() THEN 'lease expired'
           WHEN state = 'submitting' THEN 'submit not confirmed for over 10 minutes'
           ELSE 'running for over an hour'
       END AS reason
FROM wfq.runs
WHERE state IN ('queued', 'submitting', 'running')
  AND ((lease_owner IS NOT NULL AND lease_expires_at < now())
       OR (state = 'submitting' AND updated_at < now() - interval '10 minutes')
       OR (state = 'running' AND submitted_at < now() - interval '1 hour'));

COMMENT ON VIEW wfq.stuck_runs IS 'active runs past a threshold, or with an expired lease';

-- Retention walks finished runs by age.
CREATE INDEX runs_finished_idx ON wfq.runs (finished_at) WHERE state IN ('succeeded', 'failed', 'canceled');
