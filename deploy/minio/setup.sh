#!/bin/sh
# One-shot (the compose service `minio-setup`, image minio/mc): creates the bucket and sends its
# "object created" events under imports/ to the webhook target that the minio service defines
# through MINIO_NOTIFY_WEBHOOK_*_${WEBHOOK_ID} (POST http://api:8000/storage-events, with the
# shared secret as its auth token). Safe to run again.
set -eu
mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"
# "put" covers every s3:ObjectCreated:* event: PUT, POST (the browser's presigned POST), copies and
# completed multipart uploads. Import files are uploaded under imports/{owner}/{task_id}/.
mc event add --ignore-existing --event put --prefix imports/ "local/$BUCKET" "arn:minio:sqs::$WEBHOOK_ID:webhook"
mc event ls "local/$BUCKET"
