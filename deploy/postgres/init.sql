-- The PostgreSQL side of deploy/datasets.toml (dataset "samples"). The postgres image runs the
-- files of /docker-entrypoint-initdb.d once, when it starts on an empty data volume; after that
-- the table is yours (`docker compose down -v` starts over).
-- Column names and types must match the dataset's columns: tests/test_deploy.py checks that.

CREATE TABLE IF NOT EXISTS samples (
    sample_id    text PRIMARY KEY,
    site         text,
    collected_on date,
    depth_m      double precision,
    au_ppm       double precision,
    cu_pct       double precision,
    assayed      boolean,
    lab_batch    integer,
    logged_at    timestamptz
);

-- A few thousand deterministic rows, so that an export has something to show at once.
INSERT INTO samples
SELECT 'S' || lpad(i::text, 6, '0'),
       (ARRAY['North Ridge', 'Ørsted Fell', 'Quarry 7', 'Basin "East"', 'Cairn; Low'])[1 + i % 5],
       date '2020-01-01' + (i % 1500),
       round((5 + (i * 37) % 400 + (i % 10) / 10.0)::numeric, 1),
       CASE WHEN i % 13 = 0 THEN NULL ELSE round(((i * 7919) % 10000 / 1000.0)::numeric, 3) END,
       round(((i * 104729) % 5000 / 1000.0)::numeric, 3),
       i % 4 <> 0,
       1 + i / 250,
       timestamptz '2020-01-01 08:00:00+00' + make_interval(mins => i * 17)
FROM generate_series(1, 5000) AS i
ON CONFLICT (sample_id) DO NOTHING;
