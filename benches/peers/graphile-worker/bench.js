// graphile-worker 0.16 peer of `wfq bench`: starts one runner with
// CONCURRENCY, adds JOBS jobs in one add_jobs statement, waits until the jobs
// table is empty (graphile-worker deletes a job when it succeeds) and prints
// `figure=peer_graphile_worker_<KIND> value=<jobs/s> ...`.
//
// KIND=http: each job makes one HTTP request to the simulator
// (GET {SIM_URL}/workflow/market/info, Node's fetch with keep-alive);
// KIND=noop: the job does nothing.
"use strict";
const { run, makeWorkerUtils, Logger } = require("graphile-worker");

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

async function main() {
  const connectionString = env("DATABASE_URL");
  const jobs = Number(env("JOBS"));
  const concurrency = Number(env("CONCURRENCY"));
  const kind = env("KIND");
  const url = `${env("SIM_URL")}/workflow/market/info?workflow_id=wf_861ef31e94dcfb10e6e7`;
  const headers = { authorization: `Bearer ${env("SIM_API_KEY")}` };
  const quiet = new Logger(() => () => {});

  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  await utils.withPgClient((c) => c.query("DELETE FROM graphile_worker._private_jobs"));

  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    pollInterval: 1000,
    logger: quiet,
    taskList: {
      http: async () => {
        const res = await fetch(url, { headers });
        if (!res.ok) throw new Error(`simulator answered ${res.status}`);
        await res.arrayBuffer();
      },
      noop: async () => {},
    },
  });

  // One statement through graphile-worker's own batch function (0.16 has
  // no addJobs in JS; graphile_worker.add_jobs is its SQL API).
  const started = process.hrtime.bigint();
  await utils.withPgClient((c) =>
    c.query(
      `SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
         SELECT ROW($1::text, json_build_object('n', g), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
         FROM generate_series(1, $2::int) g))`,
      [kind, jobs],
    ),
  );
  let failed = 0;
  for (;;) {
    await new Promise((r) => setTimeout(r, 20));
    const { rows } = await utils.withPgClient((c) =>
      c.query("SELECT count(*)::int AS open, count(*) FILTER (WHERE last_error IS NOT NULL)::int AS failed FROM graphile_worker._private_jobs"),
    );
    failed = rows[0].failed;
    if (rows[0].open === rows[0].failed) break;
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await runner.stop();
  await utils.release();
  console.log(
    `figure=peer_graphile_worker_${kind} value=${(jobs / seconds).toFixed(0)} unit=jobs/s target=reported jobs=${jobs} seconds=${seconds.toFixed(2)} failed=${failed} concurrency=${concurrency}`,
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
