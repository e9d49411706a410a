// HTTP side of the browser client: GraphQL over fetch, the dev token, the upload of an import
// file (XMLHttpRequest, for its progress events), and the words for every error code.

/** A top-level GraphQL error (no token, bad token, rate limit …) or a failed HTTP request. */
export class ApiError extends Error {
  constructor(message, code = null, errors = []) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.errors = errors;
  }
}

export class Api {
  /**
   * @param {{endpoint?: string, getToken: () => string | null, onUnauthenticated?: () => Promise<boolean>}} options
   *   onUnauthenticated: called once when the server says UNAUTHENTICATED; resolve true after
   *   getting a new token to have the request sent again.
   */
  constructor({ endpoint = "graphql", getToken, onUnauthenticated }) {
    this.endpoint = new URL(endpoint, document.baseURI).toString();
    this.getToken = getToken;
    this.onUnauthenticated = onUnauthenticated;
  }

  /** The `data` of a GraphQL operation; top-level errors throw an ApiError. */
  async query(query, variables = {}, { retried = false } = {}) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const token = this.getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(this.endpoint, { method: "POST", headers, body: JSON.stringify({ query, variables }) });
    } catch (e) {
      throw new ApiError("Dataport cannot be reached. Check your connection and try again.", "NETWORK");
    }
    let body;
    try {
      body = await response.json();
    } catch {
      throw new ApiError(`Dataport answered ${response.status} ${response.statusText} without a GraphQL body.`, "HTTP");
    }
    if (body.errors && body.errors.length) {
      const code = body.errors.find((e) => e.extensions && e.extensions.code)?.extensions.code ?? null;
      if (code === "UNAUTHENTICATED" && !retried && this.onUnauthenticated && (await this.onUnauthenticated())) {
        return this.query(query, variables, { retried: true });
      }
      throw new ApiError(body.errors.map((e) => e.message).join("; "), code, body.errors);
    }
    return body.data;
  }
}

/** A token from `POST /dev/token?user=` (dev mode only); null when the server is not in dev mode. */
export async function fetchDevToken(user) {
  const url = new URL("dev/token", document.baseURI);
  url.searchParams.set("user", user);
  let response;
  try {
    response = await fetch(url, { method: "POST" });
  } catch {
    throw new ApiError("Dataport cannot be reached. Check your connection and try again.", "NETWORK");
  }
  if (response.status === 404 || response.status === 405) return null;
  if (!response.ok) throw new ApiError(`The dev token route answered ${response.status}.`, "HTTP");
  return (await response.text()).trim();
}

/** The identity provider the api advertises (`GET /auth/config`), or null when it names none. */
export async function fetchAuthConfig() {
  try {
    const response = await fetch(new URL("auth/config", document.baseURI));
    if (!response.ok) return null;
    const config = await response.json();
    return config.issuer && config.clientId ? config : null;
  } catch {
    return null;
  }
}

/**
 * Send an import file to the target `requestImport` gave: a PUT with exactly its headers, or a
 * multipart POST with its `fields` in order and the file last, as `file`. `onProgress(loaded,
 * total)` follows the bytes. Returns {promise, abort}.
 */
export function uploadFile(target, file, onProgress) {
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open(target.method, target.url);
    let body = file;
    if (target.method === "POST") {
      body = new FormData();
      for (const [name, value] of Object.entries(target.fields || {})) body.append(name, value);
      body.append("file", file);
    } else {
      for (const [name, value] of Object.entries(target.headers || {})) {
        if (!/^(content-length|host)$/i.test(name)) xhr.setRequestHeader(name, value);
      }
    }
    xhr.upload.onprogress = (event) => onProgress?.(event.loaded, event.lengthComputable ? event.total : file.size);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress?.(file.size, file.size);
        resolve();
      } else {
        reject(new ApiError(uploadFailure(xhr.status, xhr.responseText), `HTTP_${xhr.status}`));
      }
    };
    xhr.onerror = () => reject(new ApiError("The upload failed: the storage server could not be reached.", "NETWORK"));
    xhr.onabort = () => reject(new ApiError("The upload was cancelled.", "ABORTED"));
    xhr.send(body);
  });
  return { promise, abort: () => xhr.abort() };
}

function uploadFailure(status, text) {
  let detail = "";
  try {
    detail = JSON.parse(text).detail || "";
  } catch {
    detail = (text || "").replace(/<[^>]+>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  }
  const why = {
    403: "The upload link is invalid or has expired; start the import again.",
    409: "This import no longer takes a file.",
    413: "The file is larger than the server accepts.",
  }[status] || `The storage server answered ${status}.`;
  return detail && !why.includes(detail) ? `${why} (${detail})` : why;
}

/** Every `userErrors` code, and the top-level codes, in words a person can act on. */
export const ERROR_MESSAGES = {
  // exports
  DATASET_NOT_FOUND: "That dataset does not exist (any more). Pick another one.",
  UNKNOWN_COLUMN: "One of the columns is not in this dataset.",
  DUPLICATE_COLUMN: "A column is chosen twice; choose each column once.",
  NO_COLUMNS: "Choose at least one column.",
  INVALID_LIMIT: "The row limit must be a whole number greater than zero.",
  NOT_FILTERABLE: "That column cannot be filtered on.",
  NOT_SORTABLE: "That column cannot be sorted on.",
  UNSUPPORTED_OPERATOR: "That filter operator does not work on this column's type.",
  INVALID_FILTER_VALUE: "A filter value does not fit its column's type.",
  TOO_MANY_VALUES: "A filter has too many values.",
  TOO_MANY_ROWS: "Too many rows match. Narrow the filters or set a row limit.",
  UNSUPPORTED_FORMAT: "This file format is not available here.",
  SOURCE_UNAVAILABLE: "The data store behind this dataset cannot be reached right now. Try again in a moment.",
  NOT_FOUND: "That task no longer exists (or belongs to someone else).",
  INVALID_STATUS: "That cannot be done in the task's current state.",
  // imports
  NOT_IMPORTABLE: "This dataset does not take imports.",
  NO_KEY: "Upsert needs a dataset with a key; use Insert instead.",
  INVALID_FILE_NAME: "The file name is not acceptable; rename the file and try again.",
  FILE_TOO_LARGE: "The file is too large to import.",
  INVALID_MAX_ERRORS: "“Stop after failed rows” must be a whole number greater than zero.",
  UPLOAD_MISSING: "The file has not arrived in storage; upload it again.",
  UPLOAD_EXPIRED: "The upload window has closed; start the import again.",
  FILE_SIZE_MISMATCH: "The uploaded file is not the size announced; upload it again.",
  QUOTA_EXCEEDED: "You have too many exports and imports running. Wait for one to finish, or cancel one.",
  // top-level
  UNAUTHENTICATED: "You are not signed in, or your token has expired. Sign in again.",
  RATE_LIMITED: "Too many requests just now. Wait a moment and try again.",
  QUERY_TOO_COMPLEX: "The request is too large or too deeply nested for Dataport to run.",
  PAYLOAD_TOO_LARGE: "The request is too large to send.",
  BAD_REQUEST: "The request could not be read.",
  GRAPHQL_VALIDATION_FAILED: "The request does not fit Dataport's API.",
  SERVICE_UNAVAILABLE: "Dataport is briefly unavailable. It will try again by itself.",
  NETWORK: "Dataport cannot be reached.",
  // a failed task's error.code
  SOURCE_ERROR: "The data store reported an error while reading.",
  STORAGE_ERROR: "The file storage reported an error.",
  TRANSIENT_ERROR: "It kept failing on a temporary problem and gave up after several tries.",
  INVALID_REQUEST: "The request is no longer valid for this dataset.",
  INTERNAL_ERROR: "Something went wrong inside Dataport.",
  INVALID_FILE: "The file could not be read.",
  INVALID_HEADER: "The file's header does not match the dataset's columns.",
  TOO_MANY_ERRORS: "Too many rows failed, so nothing was written. See the error report.",
  WRITE_FAILED: "Writing the rows failed, so nothing was written.",
  FILE_LIMIT_EXCEEDED: "The file goes past a size or nesting limit, so nothing was written.",
};

/** {summary, detail}: the friendly sentence for `code`, and the server's own message beside it. */
export function describeError(code, message) {
  const summary = ERROR_MESSAGES[code] || "Something went wrong.";
  const detail = message && message !== summary ? message : "";
  return { summary, detail, code };
}
