#!/bin/sh
# One-shot (the compose service `opensearch-setup`): creates each index of this folder, named after
# its JSON file (field_notes.json -> index field_notes), unless it exists already. Safe to run again.
set -eu
url="${OPENSEARCH_URL:-http://opensearch:9200}"
for body in /init/*.json; do
  index="$(basename "$body" .json)"
  status="$(curl -s -o /dev/null -w '%{http_code}' "$url/$index")"
  if [ "$status" = 200 ]; then
    echo "index $index exists"
    continue
  fi
  status="$(curl -sS -o /tmp/answer -w '%{http_code}' -X PUT "$url/$index" \
    -H 'Content-Type: application/json' --data-binary "@$body")"
  if [ "$status" != 200 ]; then
    echo "creating index $index failed with HTTP $status:" >&2
    cat /tmp/answer >&2
    exit 1
  fi
  echo "created index $index"
done
