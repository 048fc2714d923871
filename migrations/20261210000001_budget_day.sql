-- wfq.daily_costs counts days as the spend guard does: midnight to
-- midnight in worker.budget_timezone, not in the reading session's time
-- zone (which made its days differ from the daily budget's). The worker
-- stores its zone in wfq.settings at start-up; until one has, UTC (the
-- default of worker.budget_timezone). Upgrade-safe: a new table, a new
-- function, and the view replaced with the same columns plus new ones at
-- the end.
SET LOCAL lock_timeout = '500ms';

CREATE TABLE IF NOT EXISTS wfq.settings (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE wfq.settings IS
    'settings the workers share with SQL readers (budget_timezone: the zone of the daily budget''s days)';

-- The zone of the spend guard's budget days.
CREATE OR REPLACE FUNCTION wfq.budget_timezone() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT value FROM wfq.settings WHERE name = 'budget_timezone'), 'UTC')
$$;
COMMENT ON FUNCTION wfq.budget_timezone() IS
    'worker.budget_timezone as the workers last stored it (UTC until one has)';

-- Money per budget day, provider profile and workflow. A run counts on the
-- day it was submitted. `day` is when that budget day began (an instant;
-- `budget_date` is its calendar date in `budget_timezone`). Amounts not
-- known yet count as zero in `final`; runs whose cost the provider never
-- reported are counted in `unknown_cost_runs`, with the spend guard's
-- estimate of them in `estimated`.
CREATE OR REPLACE VIEW wfq.daily_costs AS
SELECT date_trunc('day', coalesce(submitted_at, created_at) AT TIME ZONE z.zone) AT TIME ZONE z.zone AS day,
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
       coalesce(sum(frozen_amount) FILTER (WHERE settled_at IS NULL), 0) AS outstanding_frozen,
       (coalesce(submitted_at, created_at) AT TIME ZONE z.zone)::date AS budget_date,
       z.zone                                    AS budget_timezone,
       count(*) FILTER (WHERE finished_at IS NOT NULL AND settled_at IS NULL
                          AND final_amount IS NULL AND frozen_amount IS NULL) AS unknown_cost_runs,
       coalesce(sum(coalesce(quote_amount, cost_estimate))
                FILTER (WHERE finished_at IS NOT NULL AND settled_at IS NULL
                          AND final_amount IS NULL AND frozen_amount IS NULL), 0) AS estimated
FROM wfq.runs, (SELECT wfq.budget_timezone() AS zone) z
WHERE submitted_at IS NOT NULL OR frozen_amount IS NOT NULL
GROUP BY 1, 2, 3, 4, 13, 14;

COMMENT ON VIEW wfq.daily_costs IS
    'money per budget day (of submission, in worker.budget_timezone), provider profile and workflow';
