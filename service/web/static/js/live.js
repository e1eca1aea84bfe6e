// Following a classifier while it trains: server-sent events from GET …/events, read with fetch
// (EventSource cannot send an API key), with `Last-Event-ID` on reconnect. Where the stream is
// missing (404: a server without it) or broken (a proxy that buffers or cuts it), it falls back
// to polling GET /v1/classifiers/{id} once a second.

import {api} from "./api.js";

const QUIET_S = 25; // no event and no keep-alive for this long: the stream is not coming through
const POLL_MS = 1000;
const TERMINAL = new Set(["ready", "failed", "cancelled"]);

/** Splits a text/event-stream into events; feed(chunk) returns the complete ones so far. */
export function eventParser() {
  let buffer = "";
  let event = {type: "message", data: [], id: null};
  return function feed(chunk) {
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    const done = [];
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) done.push({type: event.type, id: event.id, data: event.data.join("\n")});
        event = {type: "message", data: [], id: null};
        continue;
      }
      if (line.startsWith(":")) {
        done.push({type: "keep-alive"});
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
    return done;
  };
}

/**
 * Calls on.resource(classifier) whenever the classifier changes, on.progress(p), on.epoch(row)
 * as events arrive, on.finished() once training is over, on.missing() if there is no such
 * classifier (any more). Returns stop().
 */
export function follow(id, on) {
  let stopped = false;
  let controller = null;
  let timer = null;
  let lastId = null;
  const base = `v1/classifiers/${encodeURIComponent(id)}`;

  async function refresh() {
    const classifier = await api(base, {quiet: [404]});
    if (!stopped) on.resource(classifier);
    return classifier;
  }

  function poll() {
    on.mode?.("polling");
    const tick = async () => {
      if (stopped) return;
      try {
        const classifier = await refresh();
        if (TERMINAL.has(classifier.status) && !classifier.progress) {
          on.finished();
          return;
        }
      } catch (error) {
        if (error.status === 404) {
          on.missing?.();
          return;
        }
      }
      if (!stopped) timer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  async function stream(retries) {
    controller = new AbortController();
    let watchdog;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), QUIET_S * 1000);
    };
    let finished = false;
    try {
      const response = await api(`${base}/events`, {raw: true, quiet: [404, 405, 501, 503],
        signal: controller.signal,
        headers: {Accept: "text/event-stream", ...(lastId ? {"Last-Event-ID": lastId} : {})}});
      if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        throw new Error("not an event stream");
      }
      on.mode?.("events");
      arm();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const feed = eventParser();
      for (;;) {
        const {value, done} = await reader.read();
        if (done || stopped) break;
        arm();
        for (const event of feed(value)) {
          if (event.id) lastId = event.id;
          finished = await dispatch(event) || finished;
        }
        if (finished) break;
      }
    } catch (error) {
      if (stopped) return;
      if (error.status === 401) return; // the app asks for a key
      clearTimeout(watchdog);
      if (retries > 0 && error.status !== 404) {
        setTimeout(() => stream(retries - 1), POLL_MS);
      } else {
        poll();
      }
      return;
    }
    clearTimeout(watchdog);
    controller.abort();
    if (stopped) return;
    if (finished) {
      await refresh().catch(() => {});
      on.finished();
    } else if (retries > 0) {
      stream(retries - 1); // the server ended the stream early (a restart, a cap): resume
    } else {
      poll();
    }
  }

  async function dispatch(event) {
    if (event.type === "keep-alive") return false;
    let data = {};
    try {
      data = JSON.parse(event.data);
    } catch { /* a payload that is not JSON carries nothing we draw */ }
    switch (event.type) {
      case "progress": on.progress?.(data); break;
      case "epoch": on.epoch?.(data); break;
      case "status": case "version": await refresh().catch(() => {}); break;
      case "done": return true;
      default: break;
    }
    return false;
  }

  refresh().then((classifier) => {
    if (stopped) return;
    if (TERMINAL.has(classifier.status) && !classifier.progress) on.finished();
    else stream(2);
  }).catch((error) => {
    if (error.status === 404) on.missing?.();
  });

  return () => {
    stopped = true;
    clearTimeout(timer);
    controller?.abort();
  };
}
