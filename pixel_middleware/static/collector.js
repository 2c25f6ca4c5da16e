// The collector's live page: reads the JSON API (docs/api.md) and shows records
// as they arrive. Everything a sender wrote is inserted as text (textContent,
// createElement), never as HTML; the page's policy forbids inline script and
// style, eval and any other origin.
"use strict";

(function () {
  const FILTER_NAMES = ["accepted", "dialect", "call", "event", "writeKey", "userId", "anonymousId", "q"];
  const MAX_ROWS = 500;
  const FIRST_LOAD = 200;
  const POLL_WAIT_SECONDS = 20;
  const IDENTITY = [["userId", ""], ["anonymousId", "anon:"]];
  const NAME_FIELDS = ["event", "name", "groupId", "previousId"];

  const state = {
    generation: 0, // bumped on every reload: older loops stop
    cursor: null, // the API's `next`: where the live loop reads on from
    paused: false,
    controller: null,
    rows: [], // records shown, newest first
    selectedId: null,
    status: null,
    countsTimer: null,
  };

  const $ = (id) => document.getElementById(id);
  const form = $("filters");

  // The filter lives in the page's query string, so a view can be bookmarked.
  function filterParams() {
    const page = new URLSearchParams(window.location.search);
    const params = new URLSearchParams();
    for (const [name, value] of page) {
      if ((FILTER_NAMES.includes(name) || name.includes(".")) && value !== "") {
        params.append(name, value);
      }
    }
    return params;
  }

  function formToUrl() {
    const params = new URLSearchParams();
    for (const name of FILTER_NAMES) {
      const value = form.elements[name].value.trim();
      if (value !== "") params.set(name, value);
    }
    // Event-path filters (properties.plan=pro) come from the URL only; keep them.
    for (const [name, value] of filterParams()) {
      if (name.includes(".")) params.append(name, value);
    }
    const query = params.toString();
    history.replaceState(null, "", query ? "?" + query : window.location.pathname);
  }

  function urlToForm() {
    const params = filterParams();
    for (const name of FILTER_NAMES) {
      form.elements[name].value = params.get(name) || "";
    }
    const extra = $("extra-filters");
    extra.replaceChildren();
    for (const [name, value] of params) {
      if (!name.includes(".")) continue;
      const chip = el("span", "chip", name + " = " + value);
      const remove = el("button", "", "\u00d7");
      remove.type = "button";
      remove.title = "remove this filter";
      remove.addEventListener("click", () => {
        const page = new URLSearchParams(window.location.search);
        page.delete(name);
        const query = page.toString();
        history.replaceState(null, "", query ? "?" + query : window.location.pathname);
        urlToForm();
        reload();
      });
      chip.append(remove);
      extra.append(chip);
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function asText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function eventName(record) {
    const event = record.event || {};
    for (const key of NAME_FIELDS) {
      const value = event[key];
      if (value !== undefined && value !== null && value !== "") return asText(value);
    }
    return "";
  }

  function identity(record) {
    const event = record.event || {};
    for (const [key, label] of IDENTITY) {
      const value = event[key];
      if (value !== undefined && value !== null && value !== "") return label + asText(value);
    }
    return "";
  }

  function showError(message) {
    const banner = $("error-banner");
    banner.textContent = message;
    banner.hidden = !message;
  }

  // From every status and events answer: what waits in the spool, and whether
  // records cannot be kept at all (neither the store nor the spool takes them).
  function showSpooled(spooled, stalled) {
    const warning = $("spool-warning");
    const parts = [];
    if (stalled) {
      parts.push(
        el("strong", "", "Records cannot be kept now:"),
        document.createTextNode(
          " neither the store nor the spool takes writes (a full disk, or a store that" +
            " refuses them). New pixels are answered 503 instead of being recorded until" +
            " one of them recovers; the collector's log says why. "
        )
      );
    }
    if (spooled) {
      parts.push(
        el("strong", "", spooled + " record(s) wait in the spool"),
        document.createTextNode(
          " on the collector's disk: the store did not take them. They are kept and handed to" +
            " the store, in order, as soon as it takes writes again; until then they are not" +
            " listed here."
        )
      );
    }
    warning.replaceChildren(...parts);
    warning.hidden = parts.length === 0;
  }

  async function getJSON(path, signal) {
    const response = await fetch(path, { cache: "no-store", signal });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const why = body && typeof body.error === "string" ? body.error : "HTTP " + response.status;
      throw new Error(why);
    }
    return body;
  }

  // Rows ----------------------------------------------------------------

  function rowFor(record, isNew) {
    const accepted = Boolean(record.accepted);
    const tr = el("tr", (accepted ? "accepted" : "rejected") + (isNew ? " new" : ""));
    tr.tabIndex = 0;
    tr.dataset.id = String(record.id);
    const rules = (record.problems || []).map((p) => p.rule).join(", ");
    const cells = [
      ["time", String(record.receivedAt || "").replace("T", " ").replace("Z", "")],
      ["", accepted ? "accepted" : "rejected"],
      ["", record.dialect],
      ["", record.call],
      ["", eventName(record)],
      ["", identity(record)],
      ["", rules],
    ];
    for (const [className, text] of cells) tr.append(el("td", className, text));
    if (state.selectedId === tr.dataset.id) tr.classList.add("selected");
    tr.addEventListener("click", () => openRecord(record));
    tr.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openRecord(record);
    });
    return tr;
  }

  function renderAll() {
    const body = document.querySelector("#records tbody");
    body.replaceChildren(...state.rows.map((record) => rowFor(record, false)));
    $("empty").hidden = state.rows.length > 0;
  }

  function addNewest(records) {
    // `records` oldest first: each goes on top.
    const body = document.querySelector("#records tbody");
    for (const record of records) {
      state.rows.unshift(record);
      body.prepend(rowFor(record, true));
    }
    while (state.rows.length > MAX_ROWS) {
      state.rows.pop();
      body.lastElementChild.remove();
    }
    $("empty").hidden = state.rows.length > 0;
  }

  // The record opened -----------------------------------------------------

  function shellQuote(text) {
    return "'" + text.replace(/'/g, "'\\''") + "'";
  }

  function curlFor(record) {
    const request = record.request || {};
    const path = encodeURI(String(request.path || "/"));
    const query = request.query ? "?" + request.query : "";
    const parts = ["curl -i"];
    if (request.userAgent) parts.push("-A " + shellQuote(String(request.userAgent)));
    if (request.referer) parts.push("-e " + shellQuote(String(request.referer)));
    parts.push(shellQuote(window.location.origin + path + query));
    return parts.join(" ");
  }

  function messages(list, items, none) {
    list.replaceChildren();
    if (!items || items.length === 0) {
      list.append(el("li", "muted", none));
      return;
    }
    for (const item of items) {
      const li = el("li");
      li.append(el("code", "", item.rule), document.createTextNode(": " + item.message));
      list.append(li);
    }
  }

  function openRecord(record) {
    state.selectedId = String(record.id);
    for (const tr of document.querySelectorAll("#records tbody tr")) {
      tr.classList.toggle("selected", tr.dataset.id === state.selectedId);
    }
    const accepted = Boolean(record.accepted);
    const badge = $("detail-verdict");
    badge.textContent = accepted ? "accepted" : "rejected";
    badge.className = "badge " + (accepted ? "accepted" : "rejected");
    $("detail-id").textContent = String(record.id);
    messages($("detail-problems"), record.problems, "none");
    messages($("detail-notes"), record.notes, "none");
    const request = record.request || {};
    const rows = [
      ["received", record.receivedAt],
      ["dialect", record.dialect],
      ["call", record.call],
      ["write key", record.writeKey],
      ["method", request.method],
      ["path", request.path],
      ["query", request.query],
      ["IP", request.ip],
      ["User-Agent", request.userAgent],
    ];
    if (request.referer) rows.push(["Referer", request.referer]);
    if (record.upstream) rows.push(["upstream", JSON.stringify(record.upstream)]);
    const table = $("detail-request");
    table.replaceChildren();
    for (const [name, value] of rows) {
      const tr = el("tr");
      tr.append(el("th", "", name), el("td", "", value === null || value === undefined ? "" : value));
      table.append(tr);
    }
    $("detail-curl").textContent = curlFor(record);
    $("detail-event").textContent = JSON.stringify(record.event, null, 2);
    $("copy-result").textContent = "";
    $("detail").hidden = false;
    state.opened = record;
  }

  async function copy(text, what) {
    const result = $("copy-result");
    try {
      await navigator.clipboard.writeText(text);
      result.textContent = what + " copied";
    } catch (error) {
      result.textContent = "could not copy: select the text below";
    }
  }

  // Loading -------------------------------------------------------------

  function apiPath(route, extra) {
    const params = filterParams();
    for (const [name, value] of Object.entries(extra || {})) {
      if (value !== null && value !== undefined) params.set(name, String(value));
    }
    const query = params.toString();
    return "api/" + route + (query ? "?" + query : "");
  }

  async function refreshCounts() {
    try {
      const counts = await getJSON(apiPath("counts"));
      $("count-total").textContent = String(counts.total);
      $("count-accepted").textContent = String(counts.accepted);
      $("count-rejected").textContent = String(counts.rejected);
      const byCall = $("count-calls");
      byCall.replaceChildren();
      for (const [call, n] of Object.entries(counts.byCall)) {
        byCall.append(el("span", "", call + ": " + n));
      }
      $("count-incomplete").hidden = Boolean(counts.complete);
    } catch (error) {
      showError("Could not count the records: " + error.message);
    }
  }

  function countsSoon() {
    clearTimeout(state.countsTimer);
    state.countsTimer = setTimeout(refreshCounts, 250);
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function reload() {
    state.generation += 1;
    const generation = state.generation;
    if (state.controller) state.controller.abort();
    state.controller = new AbortController();
    $("api-link").href = apiPath("events");
    try {
      const page = await getJSON(
        apiPath("events", { order: "desc", limit: FIRST_LOAD }),
        state.controller.signal
      );
      if (generation !== state.generation) return;
      showError("");
      state.rows = page.records;
      state.cursor = page.next;
      showSpooled(page.spooled, page.stalled);
      renderAll();
      refreshCounts();
    } catch (error) {
      if (error.name === "AbortError") return;
      showError("Could not read the records: " + error.message);
      return;
    }
    follow(generation);
  }

  async function follow(generation) {
    while (generation === state.generation && !state.paused) {
      const started = Date.now();
      try {
        const page = await getJSON(
          apiPath("events", {
            after: state.cursor,
            order: "asc",
            limit: 500,
            wait: POLL_WAIT_SECONDS,
          }),
          state.controller.signal
        );
        if (generation !== state.generation || state.paused) return;
        showError("");
        showSpooled(page.spooled, page.stalled);
        if (page.records.length) {
          addNewest(page.records);
          countsSoon();
        }
        state.cursor = page.next;
        if (!page.more && !page.records.length && Date.now() - started < 1000) {
          await sleep(1000); // the server could not wait for us: do not spin
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        showError("Lost the collector (" + error.message + "); trying again");
        await sleep(2000);
      }
    }
  }

  function setPaused(paused) {
    state.paused = paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    const live = $("live-state");
    live.textContent = paused ? "paused" : "live";
    live.classList.toggle("paused", paused);
    if (paused) {
      if (state.controller) state.controller.abort();
    } else {
      state.controller = new AbortController();
      follow(state.generation);
    }
  }

  // The collector itself ----------------------------------------------------

  async function loadStatus() {
    try {
      const status = await getJSON("api/status");
      state.status = status;
      $("store-line").textContent =
        "Store: " + status.store + " (" + status.storeUrl + ")" +
        (status.canReset ? "; POST api/reset clears it" : "");
      showSpooled(status.spooled, status.stalled);
      const examples = $("help-examples");
      examples.replaceChildren();
      for (const pixel of status.testPixels) {
        const url = window.location.origin + pixel.path;
        examples.append(
          el("h4", "", pixel.dialect + " " + pixel.call),
          el("pre", "", '<img src="' + url.replace(/&/g, "&amp;").replace(/"/g, "&quot;") +
            '" width="1" height="1" alt="">'),
          el("pre", "", "curl -i " + shellQuote(url))
        );
      }
      $("test-pixel").disabled = status.testPixels.length === 0;
    } catch (error) {
      showError("Could not reach the collector's API: " + error.message);
    }
  }

  async function sendTestPixel() {
    const result = $("test-pixel-result");
    const pixel = state.status && state.status.testPixels[0];
    if (!pixel) return;
    try {
      const response = await fetch(pixel.path, { cache: "no-store" });
      result.textContent = response.ok ? "test pixel sent" : "the test pixel got " + response.status;
    } catch (error) {
      result.textContent = "could not send the test pixel";
    }
  }

  // Wiring ------------------------------------------------------------------

  let typing = null;
  function filtersChanged() {
    clearTimeout(typing);
    typing = setTimeout(() => {
      formToUrl();
      reload();
    }, 300);
  }

  form.addEventListener("submit", (event) => event.preventDefault());
  form.addEventListener("input", filtersChanged);
  form.addEventListener("change", filtersChanged);
  $("clear-filters").addEventListener("click", () => {
    history.replaceState(null, "", window.location.pathname);
    urlToForm();
    reload();
  });
  $("pause").addEventListener("click", () => setPaused(!state.paused));
  $("test-pixel").addEventListener("click", sendTestPixel);
  $("detail-close").addEventListener("click", () => {
    $("detail").hidden = true;
    state.selectedId = null;
    for (const tr of document.querySelectorAll("#records tbody tr.selected")) {
      tr.classList.remove("selected");
    }
  });
  $("copy-curl").addEventListener("click", () => copy($("detail-curl").textContent, "curl command"));
  $("copy-event").addEventListener("click", () => copy($("detail-event").textContent, "event JSON"));
  window.addEventListener("popstate", () => {
    urlToForm();
    reload();
  });

  urlToForm();
  loadStatus();
  reload();
})();
