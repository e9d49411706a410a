// A small client of the graphql-transport-ws protocol (the one Dataport's /graphql speaks on its
// WebSocket): one socket, opened on the first subscription and closed shortly after the last one
// ends, many subscriptions over it.
//
//   connection_init {payload} → connection_ack
//   subscribe {id, payload: {query, variables}} → next* → complete | error
//   ping ↔ pong, either way
//
// No reconnect: a socket that closes ends every subscription on it with an error, and the caller
// decides what to do (Dataport's client then reads the task once over HTTP).

const PROTOCOL = "graphql-transport-ws";
const IDLE_CLOSE_MS = 3000;

/** Close codes the protocol (and Strawberry) use, in words. */
const CLOSE_REASONS = {
  4400: "the server could not understand a message",
  4401: "the connection was not acknowledged",
  4403: "the server refused the connection",
  4408: "the connection was not initialised in time",
  4409: "a subscription id was used twice",
  4429: "too many connection attempts",
};

export class SubscriptionError extends Error {
  /** `errors`: the GraphQL errors of an `error` message, or [] when the socket failed. */
  constructor(message, errors = [], closeCode = null) {
    super(message);
    this.name = "SubscriptionError";
    this.errors = errors;
    this.closeCode = closeCode;
    this.code = errors.find((e) => e.extensions && e.extensions.code)?.extensions.code ?? null;
  }
}

export class GraphQLWsClient {
  /**
   * @param {string} url  ws:// or wss:// address of the GraphQL endpoint
   * @param {{connectionParams?: object | (() => object | Promise<object>)}} options
   *   connectionParams: connection_init's payload, e.g. {authorization: "Bearer …"}; a function
   *   is called for every new socket, so a changed token is picked up.
   */
  constructor(url, { connectionParams = {} } = {}) {
    this.url = url;
    this.connectionParams = connectionParams;
    this.socket = null;
    this.acknowledged = false;
    this.nextId = 1;
    this.sinks = new Map(); // id → {message, sink, sent}
    this.idleTimer = null;
  }

  /**
   * Start a subscription. `sink` gets next(data) for every result, error(SubscriptionError) once
   * if it fails, complete() once when the server ends it. Returns a function that stops it.
   */
  subscribe({ query, variables = {}, operationName }, sink) {
    const id = String(this.nextId++);
    const message = { id, type: "subscribe", payload: { query, variables, operationName } };
    this.sinks.set(id, { message, sink, sent: false });
    clearTimeout(this.idleTimer);
    this.#connect();
    if (this.acknowledged) this.#send(this.sinks.get(id));
    return () => {
      const entry = this.sinks.get(id);
      if (!entry) return;
      this.sinks.delete(id);
      if (entry.sent && this.#open()) this.socket.send(JSON.stringify({ id, type: "complete" }));
      this.#closeWhenIdle();
    };
  }

  /** Close the socket now; active subscriptions end with an error. */
  close() {
    clearTimeout(this.idleTimer);
    if (this.socket) this.socket.close(1000, "Normal Closure");
  }

  #open() {
    return this.socket && this.socket.readyState === WebSocket.OPEN;
  }

  #send(entry) {
    entry.sent = true;
    this.socket.send(JSON.stringify(entry.message));
  }

  #connect() {
    // A socket still closing after an idle spell is replaced, not reused.
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) return;
    const socket = new WebSocket(this.url, PROTOCOL);
    this.socket = socket;
    this.acknowledged = false;
    socket.onopen = async () => {
      let payload = this.connectionParams;
      try {
        if (typeof payload === "function") payload = await payload();
      } catch (e) {
        socket.close(4400, "no connection parameters");
        return;
      }
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "connection_init", payload: payload || {} }));
      }
    };
    socket.onmessage = (event) => this.#receive(socket, event.data);
    socket.onclose = (event) => {
      if (this.socket !== socket) return; // replaced while closing: it carried no subscription
      this.socket = null;
      this.acknowledged = false;
      const why = CLOSE_REASONS[event.code] || event.reason || "the connection closed";
      const failed = [...this.sinks.values()];
      this.sinks.clear();
      for (const { sink } of failed) {
        sink.error?.(new SubscriptionError(`Live updates stopped: ${why} (${event.code}).`, [], event.code));
      }
    };
  }

  #receive(socket, raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      socket.close(4400, "Invalid message");
      return;
    }
    switch (message.type) {
      case "connection_ack":
        this.acknowledged = true;
        for (const entry of this.sinks.values()) if (!entry.sent) this.#send(entry);
        this.#closeWhenIdle();
        break;
      case "ping":
        socket.send(JSON.stringify({ type: "pong" }));
        break;
      case "pong":
        break;
      case "next": {
        const entry = this.sinks.get(message.id);
        if (!entry) break;
        const { data, errors } = message.payload || {};
        if (errors && errors.length && !data) {
          this.sinks.delete(message.id);
          entry.sink.error?.(new SubscriptionError(errors.map((e) => e.message).join("; "), errors));
          this.#closeWhenIdle();
        } else {
          entry.sink.next?.(data, errors);
        }
        break;
      }
      case "error": {
        const entry = this.sinks.get(message.id);
        this.sinks.delete(message.id);
        const errors = Array.isArray(message.payload) ? message.payload : [];
        entry?.sink.error?.(new SubscriptionError(errors.map((e) => e.message).join("; ") || "error", errors));
        this.#closeWhenIdle();
        break;
      }
      case "complete": {
        const entry = this.sinks.get(message.id);
        this.sinks.delete(message.id);
        entry?.sink.complete?.();
        this.#closeWhenIdle();
        break;
      }
      default:
        break;
    }
  }

  #closeWhenIdle() {
    clearTimeout(this.idleTimer);
    if (this.sinks.size) return;
    this.idleTimer = setTimeout(() => {
      if (!this.sinks.size && this.socket) this.socket.close(1000, "Normal Closure");
    }, IDLE_CLOSE_MS);
  }
}

/** The WebSocket address of an http(s) GraphQL endpoint. */
export function webSocketUrl(httpUrl) {
  const url = new URL(httpUrl, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  return url.toString();
}
