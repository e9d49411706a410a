// Dataport's browser client: sign in, export, import, history. Plain DOM, no framework, no build.
//
//   api.js         GraphQL over HTTP, the dev token, the import upload, the words for error codes
//   graphql-ws.js  the graphql-transport-ws client that carries the progress subscriptions
//   oidc.js        sign-in through the identity provider (authorization code + PKCE)
//   app.js         this file: state, forms and task cards
//
// Every task the page knows is one entry in `tasks` (id → {kind, task, cards, …}). Cards (the
// current export, the current import, a row of the history) show an entry. One `taskUpdates`
// subscription follows every task of the user while any of them is active; its snapshots update
// every card showing the task.

import { Api, ApiError, describeError, fetchAuthConfig, fetchDevToken, uploadFile } from "./api.js";
import { GraphQLWsClient, webSocketUrl } from "./graphql-ws.js";
import { finishSignIn, startSignIn } from "./oidc.js";

// -- GraphQL documents ------------------------------------------------------------------------

const PROGRESS = "progress { processedRows totalRows percent bytes rowsPerSecond etaSeconds }";
const EXPORT_FIELDS = `id status dataset format run queuePosition rowCount fileSize downloadUrl
  label fileName compression filters anyOf limit
  createdAt startedAt finishedAt expiresAt ${PROGRESS} error { code message }`;
const IMPORT_FIELDS = `id status dataset format mode dryRun rowsImported rowsFailed errorReportUrl
  outcome failedSamples preview { newRows updatedRows unchangedRows failedRows samples }
  createdAt startedAt finishedAt ${PROGRESS} error { code message }`;
const USER_ERRORS = "userErrors { field message code }";

const Q = {
  datasets: `{ datasets { name title source importable maxExportRows streamMaxRows
               columns { name type filterable sortable } } }`,
  history: `query History($first: Int!) {
    exportTasks(first: $first) { edges { node { ${EXPORT_FIELDS} } } }
    importTasks(first: $first) { edges { node { ${IMPORT_FIELDS} } } } }`,
  exportTask: `query ExportTask($id: ID!) { exportTask(id: $id) { ${EXPORT_FIELDS} } }`,
  importTask: `query ImportTask($id: ID!) { importTask(id: $id) { ${IMPORT_FIELDS} } }`,
  requestExport: `mutation RequestExport($input: ExportInput!) {
    requestExport(input: $input) { task { ${EXPORT_FIELDS} } ${USER_ERRORS} } }`,
  cancelExport: `mutation CancelExport($id: ID!) { cancelExport(id: $id) { task { ${EXPORT_FIELDS} } ${USER_ERRORS} } }`,
  retryExport: `mutation RetryExport($id: ID!) { retryExport(id: $id) { task { ${EXPORT_FIELDS} } ${USER_ERRORS} } }`,
  requestImport: `mutation RequestImport($input: ImportInput!) {
    requestImport(input: $input) { task { ${IMPORT_FIELDS} upload { url method headers fields expiresAt } }
                                   ${USER_ERRORS} } }`,
  startImport: `mutation StartImport($id: ID!) { startImport(id: $id) { task { ${IMPORT_FIELDS} } ${USER_ERRORS} } }`,
  cancelImport: `mutation CancelImport($id: ID!) { cancelImport(id: $id) { task { ${IMPORT_FIELDS} } ${USER_ERRORS} } }`,
  taskUpdates: `subscription TaskUpdates { taskUpdates { __typename
    ... on ExportTask { ${EXPORT_FIELDS} } ... on ImportTask { ${IMPORT_FIELDS} } } }`,
};

const ACTIVE = new Set(["WAITING_FOR_UPLOAD", "PENDING", "PROCESSING"]);
const STATUS_WORDS = {
  WAITING_FOR_UPLOAD: "waiting for the file",
  PENDING: "queued",
  PROCESSING: "running",
  SUCCEEDED: "done",
  FAILED: "failed",
  CANCELLED: "cancelled",
  EXPIRED: "expired",
};
const OPERATORS = {
  EQ: "equals", NE: "does not equal", GT: "greater than", GTE: "at least", LT: "less than", LTE: "at most",
  IN: "is one of", NOT_IN: "is none of", CONTAINS: "contains", PREFIX: "starts with", IS_NULL: "is empty",
  BETWEEN: "between",
};
const OPERATORS_BY_TYPE = {
  string: ["EQ", "NE", "CONTAINS", "PREFIX", "IN", "NOT_IN", "GT", "GTE", "LT", "LTE", "BETWEEN", "IS_NULL"],
  boolean: ["EQ", "NE", "IN", "NOT_IN", "IS_NULL"],
  other: ["EQ", "NE", "GT", "GTE", "LT", "LTE", "BETWEEN", "IN", "NOT_IN", "IS_NULL"],
};
const FORMAT_BY_EXTENSION = { csv: "CSV", json: "JSON", ndjson: "NDJSON", jsonl: "NDJSON", xlsx: "XLSX" };
const USER_KEY = "dataport.user";
const TOKEN_KEY = "dataport.token";
const DOWNLOAD_URL_FRESH_MS = 10 * 60 * 1000; // links live 15 minutes: ask again before then

// -- state ------------------------------------------------------------------------------------

const state = { token: null, devMode: false, user: null, datasets: [], authConfig: null };
const tasks = new Map(); // id → entry
const $ = (selector, root = document) => root.querySelector(selector);

const api = new Api({ getToken: () => state.token, onUnauthenticated: renewToken });
const ws = new GraphQLWsClient(webSocketUrl("graphql"), {
  connectionParams: () => (state.token ? { authorization: `Bearer ${state.token}` } : {}),
});

// -- small helpers ----------------------------------------------------------------------------

const numberFormat = new Intl.NumberFormat();
const fmt = (n) => numberFormat.format(Math.round(n));

function formatBytes(bytes) {
  if (bytes == null) return "";
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${fmt(value)} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

const formatTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function element(tag, attributes = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value == null) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.filter((c) => c != null));
  return el;
}

/** A list of error messages: the friendly sentence first, the server's own words beside it. */
function renderErrors(container, problems) {
  container.replaceChildren(
    ...problems.map(({ code, message }) => {
      const { summary, detail } = describeError(code, message);
      return element(
        "p",
        { class: "error", "data-code": code || "" },
        element("strong", {}, summary),
        detail ? element("span", { class: "server-message" }, ` ${detail}`) : null,
      );
    }),
  );
  container.hidden = problems.length === 0;
}

function errorOf(e) {
  if (e instanceof ApiError) return { code: e.code, message: e.message };
  return { code: e.code || null, message: e.message || String(e) };
}

function showNotice(text) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// -- sign in ----------------------------------------------------------------------------------

async function signIn() {
  state.user = localStorage.getItem(USER_KEY) || "dev";
  let token = null;
  try {
    token = await fetchDevToken(state.user);
  } catch (e) {
    $("#session-status").textContent = describeError(e.code, e.message).summary;
    return;
  }
  if (token) {
    state.devMode = true;
    $("#dev-signin").hidden = false;
    $("#dev-user").value = state.user;
    await useToken(token, `Signed in as ${state.user} (dev mode).`);
  } else {
    $("#token-signin").hidden = false;
    if (await providerSignIn()) return;
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) await useToken(saved, "Signed in with your token.");
    else $("#session-status").textContent = state.authConfig
      ? "Not signed in: sign in with your provider, or paste an access token."
      : "Not signed in: paste an access token.";
  }
}

/** When the api names an identity provider: offer its sign-in, and finish one that comes back
 * (true once signed in that way). Its token is kept like a pasted one. */
async function providerSignIn() {
  state.authConfig = await fetchAuthConfig();
  if (!state.authConfig) return false;
  $("#provider-signin").hidden = false;
  let token;
  try {
    token = await finishSignIn(state.authConfig);
  } catch (e) {
    showNotice(e.message);
    return false;
  }
  if (!token || !(await useToken(token, "Signed in with your provider."))) return false;
  sessionStorage.setItem(TOKEN_KEY, token);
  return true;
}

$("#provider-signin").addEventListener("click", () => {
  startSignIn(state.authConfig).catch((e) => showNotice(e.message));
});

/** Resolves true when a new token was had (dev mode), so the request can be sent again. */
async function renewToken() {
  if (state.devMode) {
    const token = await fetchDevToken(state.user).catch(() => null);
    if (token) {
      state.token = token;
      return true;
    }
  }
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("#token-signin").hidden = state.devMode;
  $("#session-status").textContent = describeError("UNAUTHENTICATED").summary;
  return false;
}

async function useToken(token, status) {
  state.token = token;
  stopUpdates();
  ws.close(); // the next subscription opens a socket with this token
  for (const entry of tasks.values()) stopFollowing(entry);
  tasks.clear();
  $("#history-list").replaceChildren();
  $("#export-current").replaceChildren();
  $("#import-current").replaceChildren();
  try {
    await loadDatasets();
  } catch (e) {
    const { summary, detail, code } = describeError(errorOf(e).code, errorOf(e).message);
    $("#session-status").textContent = detail ? `${summary} (${detail})` : summary;
    if (code === "UNAUTHENTICATED") {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
    }
    return false;
  }
  $("#session-status").textContent = status;
  showNotice("");
  followUpdates(); // before reading the history, so no change falls between the two
  await loadHistory();
  return true;
}

$("#dev-signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = $("#dev-user").value.trim();
  if (!user) return;
  const token = await fetchDevToken(user).catch((e) => {
    showNotice(describeError(e.code, e.message).summary);
    return null;
  });
  if (!token) return;
  state.user = user;
  localStorage.setItem(USER_KEY, user);
  await useToken(token, `Signed in as ${user} (dev mode).`);
});

$("#token-signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("#token-input").value.trim().replace(/^Bearer\s+/i, "");
  if (!token) return;
  if (await useToken(token, "Signed in with your token.")) {
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#token-input").value = "";
  }
});

// -- datasets and the export form -------------------------------------------------------------

async function loadDatasets() {
  const { datasets } = await api.query(Q.datasets);
  state.datasets = datasets;
  const exportSelect = $("#export-dataset");
  const importSelect = $("#import-dataset");
  const previous = exportSelect.value;
  exportSelect.replaceChildren(
    ...datasets.map((d) => element("option", { value: d.name }, d.title ? `${d.title} (${d.name})` : d.name)),
  );
  if (datasets.some((d) => d.name === previous)) exportSelect.value = previous;
  const importable = datasets.filter((d) => d.importable);
  importSelect.replaceChildren(
    ...importable.map((d) => element("option", { value: d.name }, d.title ? `${d.title} (${d.name})` : d.name)),
  );
  $("#import-submit").disabled = importable.length === 0;
  renderDatasetForm();
}

const currentDataset = () => state.datasets.find((d) => d.name === $("#export-dataset").value);

function renderDatasetForm() {
  const dataset = currentDataset();
  const list = $("#column-list");
  $("#filter-list").replaceChildren();
  clearFieldErrors();
  if (!dataset) {
    list.replaceChildren();
    return;
  }
  $("#export-dataset-info").textContent =
    `${dataset.source}, ${dataset.columns.length} columns, at most ${fmt(dataset.maxExportRows)} rows an export`;
  list.replaceChildren(
    ...dataset.columns.map((c, i) =>
      element(
        "li",
        { "data-column": c.name },
        element("input", { type: "checkbox", id: `col-${i}`, value: c.name, checked: true, "aria-describedby": `col-${i}-type` }),
        element("label", { for: `col-${i}` }, c.name),
        element("span", { id: `col-${i}-type`, class: "type" }, c.type),
      ),
    ),
  );
  const sort = $("#export-sort");
  sort.replaceChildren(
    element("option", { value: "" }, "the dataset's order"),
    ...dataset.columns.filter((c) => c.sortable).map((c) => element("option", { value: c.name }, c.name)),
  );
  updateColumnCount();
}

function updateColumnCount() {
  const boxes = [...$("#column-list").querySelectorAll("input[type=checkbox]")];
  const chosen = boxes.filter((b) => b.checked).length;
  $("#columns-count").textContent = chosen === boxes.length ? `(all ${boxes.length})` : `(${chosen} of ${boxes.length})`;
}

function setAllColumns(checked) {
  for (const li of $("#column-list").children) {
    if (!li.hidden) li.querySelector("input").checked = checked;
  }
  updateColumnCount();
}

$("#export-dataset").addEventListener("change", renderDatasetForm);
$("#column-list").addEventListener("change", updateColumnCount);
$("#columns-all").addEventListener("click", () => setAllColumns(true));
$("#columns-none").addEventListener("click", () => setAllColumns(false));
$("#column-search").addEventListener("input", (event) => {
  const needle = event.target.value.trim().toLowerCase();
  for (const li of $("#column-list").children) li.hidden = needle !== "" && !li.dataset.column.toLowerCase().includes(needle);
});

let filterCounter = 0;

function addFilter() {
  const dataset = currentDataset();
  if (!dataset) return;
  const filterable = dataset.columns.filter((c) => c.filterable);
  const n = ++filterCounter;
  const position = $("#filter-list").children.length + 1;
  const field = element("select", { id: `filter-${n}-field`, "data-part": "field" },
    ...filterable.map((c) => element("option", { value: c.name }, `${c.name} (${c.type})`)));
  const op = element("select", { id: `filter-${n}-op`, "data-part": "op" });
  const value = element("input", { id: `filter-${n}-value`, "data-part": "value", type: "text", autocomplete: "off" });
  const flag = element("select", { id: `filter-${n}-flag`, "data-part": "flag", hidden: true },
    element("option", { value: "true" }, "yes"), element("option", { value: "false" }, "no"));
  const row = element(
    "li",
    { class: "filter" },
    element("label", { for: field.id, class: "visually-hidden" }, `Filter ${position}: column`), field,
    element("label", { for: op.id, class: "visually-hidden" }, `Filter ${position}: operator`), op,
    element("label", { for: value.id, class: "visually-hidden" }, `Filter ${position}: value`), value,
    element("label", { for: flag.id, class: "visually-hidden" }, `Filter ${position}: empty`), flag,
    element("button", { type: "button", class: "remove", "aria-label": `Remove filter ${position}`,
                        onclick: () => { row.remove(); renumberFilters(); } }, "×"),
  );
  const refreshOps = () => {
    const column = filterable.find((c) => c.name === field.value);
    const ops = OPERATORS_BY_TYPE[column?.type] || OPERATORS_BY_TYPE.other;
    const keep = op.value;
    op.replaceChildren(...ops.map((o) => element("option", { value: o }, OPERATORS[o])));
    if (ops.includes(keep)) op.value = keep;
    refreshValue();
  };
  const refreshValue = () => {
    const isNull = op.value === "IS_NULL";
    value.hidden = isNull;
    flag.hidden = !isNull;
    value.placeholder = { IN: "a, b, c", NOT_IN: "a, b, c", BETWEEN: "low, high" }[op.value] || "value";
  };
  field.addEventListener("change", refreshOps);
  op.addEventListener("change", refreshValue);
  refreshOps();
  $("#filter-list").append(row);
  field.focus();
}

function renumberFilters() {
  [...$("#filter-list").children].forEach((row, i) => {
    for (const label of row.querySelectorAll("label")) label.textContent = label.textContent.replace(/^Filter \d+/, `Filter ${i + 1}`);
    row.querySelector(".remove").setAttribute("aria-label", `Remove filter ${i + 1}`);
  });
}

$("#filter-add").addEventListener("click", addFilter);

/** The ExportInput of the form. Values go as text: the server reads them by the column's type. */
function exportInput(form) {
  const data = new FormData(form);
  const input = { dataset: data.get("dataset"), format: data.get("format") || "CSV", notify: data.get("notify") === "on" };
  const label = (data.get("label") || "").trim();
  if (label) input.label = label;
  if (data.get("compression") && data.get("compression") !== "NONE") input.compression = data.get("compression");
  const boxes = [...$("#column-list").querySelectorAll("input[type=checkbox]")];
  const chosen = boxes.filter((b) => b.checked).map((b) => b.value);
  if (chosen.length !== boxes.length) input.columns = chosen; // all of them: leave it to the dataset's order
  const filters = [...$("#filter-list").children].map((row) => {
    const field = row.querySelector("[data-part=field]").value;
    const op = row.querySelector("[data-part=op]").value;
    if (op === "IS_NULL") return { field, op, value: row.querySelector("[data-part=flag]").value === "true" };
    const raw = row.querySelector("[data-part=value]").value;
    if (["IN", "NOT_IN", "BETWEEN"].includes(op)) {
      return { field, op, values: raw.split(",").map((v) => v.trim()).filter((v) => v !== "") };
    }
    return { field, op, value: raw.trim() === "" ? null : raw.trim() };
  });
  if (filters.length) input.filters = filters;
  if (data.get("sort")) input.sort = [{ field: data.get("sort"), direction: data.get("direction") || "ASC" }];
  const limit = String(data.get("limit") || "").trim();
  if (limit !== "") input.limit = /^-?\d+$/.test(limit) ? Number(limit) : limit;
  return input;
}

function clearFieldErrors() {
  for (const el of document.querySelectorAll("[aria-invalid=true]")) {
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-errormessage");
  }
}

/** The form control a userError's `field` path points at, if the form has one. */
function exportControl(path) {
  const [, what, index, part] = path || [];
  if (what === "dataset") return $("#export-dataset");
  if (what === "columns") return $("#export-columns");
  if (what === "limit") return $("#export-limit");
  if (what === "sort") return $("#export-sort");
  if (what === "filters") {
    const row = $("#filter-list").children[Number(index)];
    if (!row) return null;
    const name = { field: "field", op: "op", value: "value", values: "value" }[part] || "value";
    const control = row.querySelector(`[data-part=${name}]`);
    return control.hidden ? row.querySelector("[data-part=flag]") : control;
  }
  return null;
}

function importControl(path) {
  const what = (path || [])[1];
  return {
    dataset: $("#import-dataset"), fileName: $("#import-file"), fileSize: $("#import-file"),
    format: $("#import-format"), maxErrors: $("#import-max-errors"),
  }[what] || null;
}

function showUserErrors(container, userErrors, controlFor) {
  clearFieldErrors();
  renderErrors(container, userErrors);
  for (const error of userErrors) {
    const control = controlFor(error.field);
    if (control) {
      control.setAttribute("aria-invalid", "true");
      control.setAttribute("aria-errormessage", container.id);
    }
  }
}

async function withBusy(button, action) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await action();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

$("#export-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const errors = $("#export-errors");
  renderErrors(errors, []);
  clearFieldErrors();
  const input = exportInput(form);
  if (typeof input.limit === "string") {
    showUserErrors(errors, [{ field: ["input", "limit"], code: "INVALID_LIMIT", message: `'${input.limit}' is not a whole number.` }], exportControl);
    return;
  }
  return withBusy($("#export-submit"), async () => {
    try {
      const { requestExport } = await api.query(Q.requestExport, { input });
      if (requestExport.userErrors.length) {
        showUserErrors(errors, requestExport.userErrors, exportControl);
        return;
      }
      const entry = track("export", requestExport.task);
      showCurrent("export", entry);
    } catch (e) {
      renderErrors(errors, [errorOf(e)]);
    }
  });
});

// -- the import form --------------------------------------------------------------------------

$("#import-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const errors = $("#import-errors");
  renderErrors(errors, []);
  clearFieldErrors();
  const file = $("#import-file").files[0];
  if (!file) {
    renderErrors(errors, [{ code: "NO_FILE", message: "Choose a file to import." }]);
    $("#import-file").setAttribute("aria-invalid", "true");
    return;
  }
  const data = new FormData(form);
  const format = data.get("format") || FORMAT_BY_EXTENSION[file.name.split(".").pop().toLowerCase()];
  if (!format) {
    renderErrors(errors, [{ code: "UNSUPPORTED_FORMAT", message: `Pick the format of '${file.name}'.` }]);
    $("#import-format").setAttribute("aria-invalid", "true");
    return;
  }
  const input = {
    dataset: data.get("dataset"), format, mode: data.get("mode") || "INSERT", fileName: file.name,
    fileSize: file.size, dryRun: data.get("dryRun") === "on",
  };
  const maxErrors = String(data.get("maxErrors") || "").trim();
  if (maxErrors !== "") {
    if (!/^-?\d+$/.test(maxErrors)) {
      showUserErrors(errors, [{ field: ["input", "maxErrors"], code: "INVALID_MAX_ERRORS", message: "" }], importControl);
      return;
    }
    input.maxErrors = Number(maxErrors);
  }
  return withBusy($("#import-submit"), async () => {
    let task;
    try {
      const { requestImport } = await api.query(Q.requestImport, { input });
      if (requestImport.userErrors.length) {
        showUserErrors(errors, requestImport.userErrors, importControl);
        return;
      }
      task = requestImport.task;
    } catch (e) {
      renderErrors(errors, [errorOf(e)]);
      return;
    }
    const { upload, ...snapshot } = task;
    const entry = track("import", { ...snapshot, fileName: file.name }, { phase: "upload", loaded: 0, total: file.size });
    showCurrent("import", entry);
    await runImport(entry, upload, file);
  });
});

/** Upload the file with byte progress, then start the import; the subscription does the rest. */
async function runImport(entry, target, file) {
  const sending = uploadFile(target, file, (loaded, total) => {
    entry.local = { ...entry.local, loaded, total };
    render(entry);
  });
  entry.local = { ...entry.local, abort: sending.abort };
  try {
    await sending.promise;
  } catch (e) {
    entry.local = null;
    if (e.code === "ABORTED") return; // cancelled: the cancel button already told the server
    entry.problem = errorOf(e);
    render(entry);
    return;
  }
  entry.local = { phase: "starting", loaded: file.size, total: file.size };
  render(entry);
  try {
    const { startImport } = await api.query(Q.startImport, { id: entry.task.id });
    entry.local = null;
    // The subscription may have pushed the end while startImport was answered, and track() below
    // ignores a read older than that: without this render the card kept "starting the import…".
    render(entry);
    if (startImport.userErrors.length) {
      // A storage notification may have started it already: then just follow it.
      const { importTask } = await api.query(Q.importTask, { id: entry.task.id });
      if (importTask && importTask.status !== "WAITING_FOR_UPLOAD") {
        track("import", importTask);
        return;
      }
      entry.problem = startImport.userErrors[0];
      render(entry);
      return;
    }
    track("import", startImport.task);
  } catch (e) {
    entry.local = null;
    entry.problem = errorOf(e);
    render(entry);
  }
}

// -- tasks: tracking, following, cards --------------------------------------------------------

/** Merge a snapshot into the page's copy of a task, update its cards, follow it while active. */
function track(kind, task, local) {
  let entry = tasks.get(task.id);
  if (!entry) {
    entry = { kind, task: {}, cards: new Set(), poll: null, local: null, problem: null };
    tasks.set(task.id, entry);
  }
  const before = entry.task.status;
  // A read older than what the page has (the history, answered after the subscription pushed the
  // end): a finished task becomes active again only when it runs again.
  if (before && !ACTIVE.has(before) && ACTIVE.has(task.status) && !((task.run || 0) > (entry.task.run || 0))) {
    return entry;
  }
  entry.task = { ...entry.task, ...task };
  if (task.downloadUrl || task.errorReportUrl) entry.urlsAt = Date.now();
  if (local !== undefined) entry.local = local;
  if (before && before !== entry.task.status) entry.problem = null; // an older problem is past
  addToHistory(entry);
  render(entry);
  follow(entry);
  return entry;
}

function follow(entry) {
  const { status } = entry.task;
  if (!ACTIVE.has(status)) {
    stopFollowing(entry);
    return;
  }
  followUpdates();
  // The queue moves without the task changing: ask for its place now and then while it waits.
  if (entry.kind === "export" && status === "PENDING" && !entry.poll) {
    entry.poll = setInterval(() => refresh(entry), 2000);
  } else if (status !== "PENDING" && entry.poll) {
    clearInterval(entry.poll);
    entry.poll = null;
  }
}

// The one subscription for all of the user's tasks (instead of one per active task).
const updates = { stop: null, failures: 0, retry: null, generation: 0 };

function followUpdates() {
  if (updates.stop || updates.retry || !state.token) return;
  const generation = updates.generation;
  const current = () => generation === updates.generation;
  updates.stop = ws.subscribe(
    { query: Q.taskUpdates },
    {
      next: (data) => {
        const task = data && data.taskUpdates;
        if (!current() || !task) return;
        updates.failures = 0;
        track(task.__typename === "ImportTask" ? "import" : "export", task);
      },
      complete: () => {
        // Ended by the server (restarting): read the tasks again, and follow them again.
        if (current()) laterUpdates();
      },
      error: (e) => {
        if (!current()) return;
        if (e.code === "UNAUTHENTICATED") {
          updates.stop = null;
          for (const entry of tasks.values()) {
            if (!ACTIVE.has(entry.task.status)) continue;
            entry.problem = errorOf(e);
            render(entry);
          }
          return;
        }
        // The socket went away, or Dataport is briefly unavailable: read the active tasks again
        // after a pause, and follow them again.
        laterUpdates();
      },
    },
  );
}

function stopUpdates() {
  updates.generation += 1;
  if (updates.stop) updates.stop();
  updates.stop = null;
  clearTimeout(updates.retry);
  updates.retry = null;
  updates.failures = 0;
}

/** After a pause that doubles with each failure in a row (1 s up to 30 s, with jitter), so that a
 * page keeps following through an outage without hammering the server: read every active task
 * once, then subscribe again if any is still active. */
function laterUpdates() {
  updates.stop = null;
  const pause = Math.min(30000, 1000 * 2 ** updates.failures) * (0.5 + Math.random() / 2);
  updates.failures += 1;
  clearTimeout(updates.retry);
  updates.retry = setTimeout(async () => {
    updates.retry = null;
    const active = [...tasks.values()].filter((entry) => ACTIVE.has(entry.task.status));
    await Promise.all(active.map((entry) => refresh(entry)));
    if ([...tasks.values()].some((entry) => ACTIVE.has(entry.task.status))) followUpdates();
  }, pause);
}

function stopFollowing(entry) {
  clearInterval(entry.poll);
  entry.poll = null;
}

/** Refresh the task after a pause that doubles with each failure in a row (1 s up to 30 s, with
 * jitter), so that a page keeps following through an outage without hammering the server. */
function later(entry) {
  const failures = entry.failures || 0;
  const pause = Math.min(30000, 1000 * 2 ** failures) * (0.5 + Math.random() / 2);
  clearTimeout(entry.retry);
  entry.retry = setTimeout(() => refresh(entry), pause);
}

const PASSING = new Set(["SERVICE_UNAVAILABLE", "NETWORK", "HTTP", "RATE_LIMITED"]);

async function refresh(entry) {
  if (tasks.get(entry.task.id) !== entry) return; // signed out meanwhile
  const query = entry.kind === "export" ? Q.exportTask : Q.importTask;
  try {
    const data = await api.query(query, { id: entry.task.id });
    const task = data.exportTask || data.importTask;
    entry.failures = 0;
    if (entry.problem && PASSING.has(entry.problem.code)) entry.problem = null; // it has passed
    if (task) track(entry.kind, task);
  } catch (e) {
    entry.problem = errorOf(e);
    render(entry);
    if (PASSING.has(e.code) && ACTIVE.has(entry.task.status)) {
      entry.failures = (entry.failures || 0) + 1;
      later(entry);
    }
  }
}

function showCurrent(kind, entry) {
  const container = $(kind === "export" ? "#export-current" : "#import-current");
  for (const old of container.children) {
    for (const other of tasks.values()) other.cards.delete(old.card);
  }
  const card = createCard(entry, { compact: false });
  container.replaceChildren(card.el);
  render(entry);
  // On a phone the form is taller than the screen: bring the progress card into view, where it is
  // below the Export (or Import) button, without moving a page on which it is already visible.
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  card.el.scrollIntoView({ block: "nearest", behavior: still ? "auto" : "smooth" });
}

function addToHistory(entry) {
  const list = $("#history-list");
  if (entry.historyItem) return;
  const card = createCard(entry, { compact: true });
  const item = element("li", { "data-task-id": entry.task.id }, card.el);
  entry.historyItem = item;
  // newest first
  const created = entry.task.createdAt || "";
  const after = [...list.children].find((li) => (tasks.get(li.dataset.taskId)?.task.createdAt || "") < created);
  list.insertBefore(item, after || null);
  $("#history-empty").hidden = true;
}

async function loadHistory() {
  try {
    const { exportTasks, importTasks } = await api.query(Q.history, { first: 20 });
    const all = [
      ...exportTasks.edges.map((e) => ["export", e.node]),
      ...importTasks.edges.map((e) => ["import", e.node]),
    ].sort((a, b) => (a[1].createdAt < b[1].createdAt ? 1 : -1));
    for (const [kind, task] of all) track(kind, task);
    $("#history-empty").hidden = tasks.size > 0;
  } catch (e) {
    showNotice(describeError(errorOf(e).code, errorOf(e).message).summary);
  }
}

$("#history-refresh").addEventListener("click", () => withBusy($("#history-refresh"), loadHistory));

/** An export's filters, any-of groups and limit in a line: "site EQ North; any of (…) or (…); limit 100". */
function exportSummary(task) {
  const one = (f) => `${f.field} ${f.op}${f.values ? ` ${f.values.join(", ")}` : f.value !== undefined && f.value !== null ? ` ${f.value}` : ""}`;
  const parts = [];
  if (task.filters && task.filters.length) parts.push(task.filters.map(one).join("; "));
  if (task.anyOf && task.anyOf.length) {
    parts.push(`any of ${task.anyOf.map((g) => `(${(g.filters || []).map(one).join(" and ")})`).join(" or ")}`);
  }
  parts.push(task.limit ? `limit ${task.limit.toLocaleString()}` : "no limit");
  if (task.fileName) parts.push(task.fileName);
  return parts.join(" · ");
}

function createCard(entry, { compact }) {
  const el = $("#task-card").content.firstElementChild.cloneNode(true);
  if (compact) el.classList.add("compact");
  const card = {
    el,
    bar: $(".bar", el),
    fill: $(".bar-fill", el),
    actionsKey: null,
    announced: null,
    update: (e) => updateCard(card, e),
  };
  el.card = card;
  el.dataset.kind = entry.kind;
  el.dataset.taskId = entry.task.id;
  entry.cards.add(card);
  return card;
}

function render(entry) {
  for (const card of entry.cards) card.update(entry);
}

/** What the bar shows: {label, percent (null: unknown), text}. */
function progressOf(entry) {
  const { task, local, kind } = entry;
  const p = task.progress || {};
  if (local && (local.phase === "upload" || local.phase === "starting")) {
    const percent = local.total ? (100 * local.loaded) / local.total : 0;
    return {
      label: "Upload progress",
      percent,
      text: local.phase === "starting"
        ? `Uploaded ${formatBytes(local.total)}; starting the import…`
        : `Uploading ${formatBytes(local.loaded)} of ${formatBytes(local.total)} (${Math.floor(percent)}%)`,
    };
  }
  const label = kind === "export" ? "Export progress" : "Import progress";
  switch (task.status) {
    case "WAITING_FOR_UPLOAD":
      return { label, percent: 0, text: "Waiting for the file to be uploaded." };
    case "PENDING":
      return {
        label, percent: 0,
        text: task.queuePosition ? `In the queue: position ${fmt(task.queuePosition)}.` : "In the queue.",
      };
    case "PROCESSING": {
      const parts = [];
      const unit = kind === "export" ? "rows" : "rows read";
      parts.push(p.totalRows != null ? `${fmt(p.processedRows)} of ${fmt(p.totalRows)} ${unit}` : `${fmt(p.processedRows)} ${unit}`);
      if (p.percent != null) parts.push(`${Math.floor(p.percent)}%`);
      if (p.rowsPerSecond) parts.push(`${fmt(p.rowsPerSecond)} rows/s`);
      if (p.etaSeconds != null) parts.push(`about ${formatDuration(p.etaSeconds)} left`);
      return { label, percent: p.percent ?? null, text: parts.join(" · ") };
    }
    case "SUCCEEDED":
      return { label, percent: 100, text: resultText(entry) };
    default:
      return { label, percent: p.percent ?? 0, text: resultText(entry) };
  }
}

function resultText({ task, kind }) {
  const processed = task.progress?.processedRows ?? 0;
  if (task.status === "EXPIRED") return "Its files were deleted after the retention period.";
  if (task.status === "CANCELLED" && !processed) return "Cancelled before it started.";
  if (kind === "export") {
    if (task.status !== "SUCCEEDED") return `Stopped after ${fmt(processed)} rows; no file was kept.`;
    return `${fmt(task.rowCount ?? processed)} rows · ${formatBytes(task.fileSize)}`;
  }
  if (task.status === "CANCELLED") return `Stopped after ${fmt(processed)} rows; nothing was written.`;
  if (!["SUCCEEDED", "FAILED"].includes(task.status)) return "";
  const read = (task.rowsImported ?? 0) + (task.rowsFailed ?? 0);
  const verb = task.dryRun ? "would be written" : "written";
  return `${fmt(read)} rows read: ${fmt(task.rowsImported ?? 0)} ${verb}, ${fmt(task.rowsFailed ?? 0)} failed.`;
}

function updateCard(card, entry) {
  const { task, kind, local } = entry;
  const el = card.el;
  const uploading = local && local.phase === "upload";
  const title = kind === "export"
    ? `Export of ${task.dataset} as ${task.format}${task.label ? ` · “${task.label}”` : ""}`
    : `Import${task.dryRun ? " (dry run)" : ""} into ${task.dataset}${entry.task.fileName ? ` from ${entry.task.fileName}` : ""}`;
  $(".task-title", el).textContent = title;
  el.dataset.status = task.status;
  const badge = $(".badge", el);
  badge.dataset.status = task.status;
  badge.textContent = uploading ? "uploading" : STATUS_WORDS[task.status] || task.status;
  // Partial failure is not success: an import that refused rows is not shown as a green "done".
  const partial = kind === "import" && ["PARTIAL", "NOTHING_WRITTEN"].includes(task.outcome);
  if (partial) {
    badge.dataset.status = task.outcome;
    el.dataset.status = task.outcome;
    badge.textContent = task.outcome === "PARTIAL" ? "done with refused rows" : "every row refused";
  }

  const { label, percent, text } = progressOf(entry);
  card.bar.setAttribute("aria-label", `${label}: ${title}`);
  if (percent == null) {
    card.bar.removeAttribute("aria-valuenow");
    card.bar.classList.add("indeterminate");
    card.bar.setAttribute("aria-valuetext", text);
    card.fill.style.width = "";
  } else {
    const value = Math.max(0, Math.min(100, Math.floor(percent)));
    card.bar.classList.remove("indeterminate");
    card.bar.setAttribute("aria-valuenow", String(value));
    card.bar.setAttribute("aria-valuetext", `${value}%${text ? ` · ${text}` : ""}`);
    card.fill.style.width = `${Math.max(0, Math.min(100, percent))}%`;
  }
  card.bar.dataset.phase = uploading ? "upload" : task.status;
  $(".stats", el).textContent = text;

  const when = task.finishedAt ? `Finished ${formatTime(task.finishedAt)}` : task.createdAt ? `Asked ${formatTime(task.createdAt)}` : "";
  // Exports: what was asked for, so that two exports of one dataset can be told apart.
  const asked = kind === "export" ? exportSummary(task) : "";
  $(".result", el).textContent = [when, asked].filter(Boolean).join(" · ");

  // Announce status changes and every quarter of the way, not every tick.
  const quarter = percent == null ? null : Math.floor(percent / 25);
  const announce = `${uploading ? "uploading" : STATUS_WORDS[task.status]}|${quarter}`;
  if (!el.classList.contains("compact") && announce !== card.announced) {
    card.announced = announce;
    $(".live", el).textContent = `${title}: ${uploading ? "uploading" : STATUS_WORDS[task.status]}. ${text}`;
  }

  const problems = [];
  if (task.status === "FAILED" && task.error) problems.push(task.error);
  if (entry.problem) problems.push(entry.problem);
  renderErrors($(".task-error", el), problems);
  if (kind === "import") renderImportDetails(el, task);

  updateActions(card, entry);
}

/** A dry run's preview (counts, cells that would change) and the first refused rows, inline. */
function renderImportDetails(el, task) {
  let box = $(".import-details", el);
  if (!box) {
    box = element("div", { class: "import-details" });
    $(".task-error", el).after(box);
  }
  const parts = [];
  const preview = task.preview;
  if (preview) {
    parts.push(element("p", { class: "preview-counts" },
      `Preview: ${fmt(preview.newRows)} new, ${fmt(preview.updatedRows)} updated, ` +
      `${fmt(preview.unchangedRows)} unchanged, ${fmt(preview.failedRows)} failed.`));
    const updated = preview.samples?.updated || [];
    if (updated.length) {
      parts.push(element("ul", { class: "preview-changes" }, ...updated.map((sample) => element("li", {},
        `Row ${sample.row}: ` + Object.entries(sample.changes || {})
          .map(([column, cell]) => `${column} ${show(cell.old)} → ${show(cell.new)}`).join(", ")))));
    }
  }
  const failed = task.failedSamples || [];
  if (failed.length && task.rowsFailed) {
    parts.push(element("p", { class: "failed-title" },
      `${fmt(task.rowsFailed)} row${task.rowsFailed === 1 ? " was" : "s were"} refused${failed.length < task.rowsFailed ? "; the first:" : ":"}`));
    parts.push(element("ul", { class: "failed-rows" }, ...failed.map((row) => element("li", {},
      `Row ${row.row}: ` + (row.errors || []).map((e) => (e.column ? `${e.column}: ${e.reason}` : e.reason)).join("; ")))));
  }
  box.replaceChildren(...parts);
  box.hidden = parts.length === 0;
}

function show(value) {
  return value === null || value === undefined ? "(empty)" : JSON.stringify(value);
}

function updateActions(card, entry) {
  const { task, kind, local } = entry;
  const cancellable = ACTIVE.has(task.status) && !(local && local.phase === "starting");
  const key = [task.status, cancellable, !!task.downloadUrl, !!task.errorReportUrl].join("|");
  const container = $(".task-actions", card.el);
  if (key === card.actionsKey) {
    // Links are signed afresh on every read: keep the newest.
    const download = $("a.download", container);
    if (download && task.downloadUrl) download.href = task.downloadUrl;
    const report = $("a.report", container);
    if (report && task.errorReportUrl) report.href = task.errorReportUrl;
    return;
  }
  card.actionsKey = key;
  const actions = [];
  if (cancellable) {
    actions.push(element("button", { type: "button", class: "cancel", onclick: () => cancel(entry) }, "Cancel"));
  }
  if (kind === "export" && task.status === "SUCCEEDED" && task.downloadUrl) {
    actions.push(element("a", {
      class: "button download primary", href: task.downloadUrl, download: "",
      onclick: (event) => freshLink(event, entry),
    }, "Download"));
  }
  if (kind === "import" && task.errorReportUrl) {
    actions.push(element("a", {
      class: "button report", href: task.errorReportUrl, download: "",
      onclick: (event) => freshLink(event, entry),
    }, "Download the error report"));
  }
  if (kind === "export" && ["FAILED", "CANCELLED"].includes(task.status)) {
    actions.push(element("button", { type: "button", onclick: () => retry(entry) }, "Try again"));
  }
  container.replaceChildren(...actions);
}

/** A link older than ten minutes is asked for again before it is followed. */
async function freshLink(event, entry) {
  if (Date.now() - (entry.urlsAt || 0) < DOWNLOAD_URL_FRESH_MS) return;
  event.preventDefault();
  const link = event.currentTarget;
  await refresh(entry);
  const url = entry.kind === "export" ? entry.task.downloadUrl : entry.task.errorReportUrl;
  if (url) {
    link.href = url;
    link.click();
  }
}

async function cancel(entry) {
  entry.local?.abort?.();
  const name = entry.kind === "export" ? "cancelExport" : "cancelImport";
  try {
    const data = await api.query(Q[name], { id: entry.task.id });
    const payload = data[name];
    entry.local = null;
    if (payload.userErrors.length) {
      entry.problem = payload.userErrors[0];
      render(entry);
    }
    if (payload.task) track(entry.kind, payload.task);
  } catch (e) {
    entry.problem = errorOf(e);
    render(entry);
  }
}

async function retry(entry) {
  try {
    const { retryExport } = await api.query(Q.retryExport, { id: entry.task.id });
    if (retryExport.userErrors.length) {
      entry.problem = retryExport.userErrors[0];
      render(entry);
      return;
    }
    track("export", retryExport.task);
  } catch (e) {
    entry.problem = errorOf(e);
    render(entry);
  }
}

signIn();
