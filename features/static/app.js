// Dialbox feature browser: one page, routed by the URL hash, its data fetched as JSON when needed.
//
//   #                             the sites (or, when there is one, that site's index)
//   #L15.resid_post?q=cat&page=2  a site's index: search, filter, sort, one page of rows at a time
//   #L15.resid_post/12            one feature (the hash is its feature ID)
//   #L15.resid_post/experts?e=L16/E37  a MoE site's experts: load and the features that most select each
//
// Tokens and labels are corpus text and may hold markup: they reach the page only as text
// nodes and attribute values (el() below), never through innerHTML.
"use strict";

const PAGE_SIZE = 100;
const SORTABLE = { index: "Feature", density: "Density", max_act: "Max act", score: "Score", output: "Output %ile",
  steer: "Steering" };
const SHOW = ["all", "labelled", "unlabelled", "dead"];
const json = new Map(); // url -> promise of its parsed JSON: each file is fetched once
let routing = 0; // the latest navigation; an older one that finishes late draws nothing

function getJSON(url) {
  if (!json.has(url)) {
    json.set(url, fetch(url).then((r) => {
      if (!r.ok) throw new Error(`could not load ${url} (HTTP ${r.status})`);
      return r.json();
    }));
    json.get(url).catch(() => json.delete(url));
  }
  return json.get(url);
}

// An element with attributes and children; strings become text nodes, so they are never parsed.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function num(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(digits - 1);
  return String(Number(x.toPrecision(digits)));
}

function count(n) {
  return n.toLocaleString("en");
}

function percent(x) {
  return x === null || x === undefined ? "–" : `${num(100 * x)}%`;
}

// Whitespace tokens must stay visible: a newline shows as ↵, a tab as →.
function shown(token) {
  return token.replace(/\n/g, "↵").replace(/\t/g, "→");
}

function featureLink(site, index, text) {
  return el("a", { href: `#${site}/${index}` }, text ?? `${site}/${index}`);
}

function tokenChips(tokens) {
  return el("span", { class: "chips" }, ...tokens.map((t) => el("span", { class: "chip" }, shown(t))));
}

// ---- routing -------------------------------------------------------------------------------

// Opened from disk, the page may not fetch its own data files (browsers refuse file:// requests): say how to serve it.
function servePrompt() {
  const run = decodeURIComponent(location.pathname).split("/").slice(-3, -2)[0] || "<run>";
  return el("section", {}, el("h1", { class: "error" }, "This report needs to be served"),
    el("p", {}, "A browser will not let a page opened from disk read its data files. Serve the report and open the " +
      "address it prints:"),
    el("pre", {}, `make browse RUN=${run}      # http://127.0.0.1:8765/`),
    el("p", { class: "muted" }, "or, without the model and the Steer panel: " +
      `make browse RUN=${run} ARGS='browse.model=false'`));
}

async function route() {
  const ticket = ++routing;
  const main = document.getElementById("main");
  if (location.protocol === "file:") return main.replaceChildren(servePrompt());
  const [rawPath, query = ""] = location.hash.slice(1).split("?");
  let view;
  try {
    const path = decodeURIComponent(rawPath);
    const { sites, chunk_size: chunkSize } = await getJSON("data/sites.json");
    const [name, index] = path.split("/");
    const site = name ? sites.find((s) => s.site === name) : sites.length === 1 ? sites[0] : null;
    if (name && !site) throw new Error(`no site ${name} in this report`);
    if (!site) view = sitesView(sites);
    else if (index === undefined) view = await siteView(site, new URLSearchParams(query));
    else if (index === "experts") view = await expertsView(site, new URLSearchParams(query).get("e"));
    else view = await featureView(site, Number(index), chunkSize);
  } catch (err) {
    view = el("p", { class: "error" }, String(err.message));
  }
  if (ticket !== routing) return;
  main.replaceChildren(view);
  window.scrollTo(0, 0);
}

// ---- the sites ----------------------------------------------------------------------------

function sitesView(sites) {
  document.title = "Dialbox features";
  const columns = ["Site", "Features", "Labelled", "Unlabelled", "Dead", "Tokens mined"];
  const rows = sites.map((s) => el("tr", {},
    el("td", {}, el("a", { href: `#${s.site}` }, s.site)),
    ...[s.n_features, s.n_labelled, s.n_unlabelled, s.n_dead, s.tokens_mined]
      .map((n) => el("td", { class: "num" }, count(n)))));
  return el("section", {}, el("h1", {}, "Sites"), el("table", { class: "grid" },
    el("thead", {}, el("tr", {}, ...columns.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
}

function siteSummary(site) {
  const parts = [`${count(site.n_features)} features`, `${count(site.n_labelled)} labelled`,
    `${count(site.n_unlabelled)} unlabelled`, `${count(site.n_dead)} dead`,
    `${count(site.tokens_mined)} tokens mined`];
  for (const key of ["model", "sae", "explainer", "scorer"]) {
    if (site[key]) parts.push(`${key}: ${typeof site[key] === "string" ? site[key] : JSON.stringify(site[key])}`);
  }
  return el("p", { class: "muted" }, parts.join(" · "));
}

// ---- a site's index -------------------------------------------------------------------------

// Output scores are shifts in probability (1e-9 to 1e-4, some negative) that no one compares at a glance: the
// index shows each one's percentile among the site's scored features, and the raw score in its title.
function outputPercentiles(data) {
  if (!data.outputPercentile) {
    const output = data.output || [];
    const scored = data.index.filter((i) => output[i] !== null && output[i] !== undefined)
      .sort((a, b) => output[a] - output[b]);
    data.outputPercentile = data.index.map(() => null);
    scored.forEach((i, rank) => {
      data.outputPercentile[i] = scored.length > 1 ? Math.round((100 * rank) / (scored.length - 1)) : 100;
    });
  }
  return data.outputPercentile;
}

function outputCell(score, percentile) {
  if (score === null) return el("td", { class: "num" }, "–");
  return el("td", { class: "num", title: `output score ${score} (percentile ${percentile} of this site)` },
    `${percentile}`);
}

// Search text and sort orders are built on first use and kept with the index data.
function searchText(data) {
  data.search ??= data.index.map((_, i) => `${data.label[i] ?? ""}\n${data.top[i].join("\n")}`.toLowerCase());
  return data.search;
}

function sortedOrder(data, key, descending) {
  data.orders ??= {};
  const name = `${key}:${descending}`;
  if (!data.orders[name]) {
    const values = data[key];
    const sign = descending ? -1 : 1;
    // Features without a value (no score) go last whichever way the column is sorted.
    data.orders[name] = data.index.slice().sort((a, b) => {
      if (values[a] === null || values[b] === null) return (values[a] === null) - (values[b] === null) || a - b;
      return sign * (values[a] - values[b]) || a - b;
    });
  }
  return data.orders[name];
}

// A query that is a feature number or ID (12, L15.resid_post/12) also finds that feature, first.
function queryIndex(site, q) {
  const m = /^(?:(L\d+\.[a-z_]+)\/)?(\d+)$/i.exec(q);
  return m && (!m[1] || m[1].toLowerCase() === site.site.toLowerCase()) ? Number(m[2]) : -1;
}

function matchingRows(site, data, state) {
  const q = state.q.trim().toLowerCase();
  const id = queryIndex(site, state.q.trim());
  const wanted = { all: () => true, labelled: (i) => data.label[i] !== null,
    unlabelled: (i) => data.label[i] === null && !data.dead[i], dead: (i) => data.dead[i] === 1 }[state.show];
  const text = q ? searchText(data) : null;
  const expert = expertQuery(site, state.q.trim());
  if (expert) return expert.features.map(([i]) => i).filter(wanted); // L5/E37: its features, by lift
  const rows = sortedOrder(data, state.sort, state.desc)
    .filter((i) => wanted(i) && (!q || i === id || text[i].includes(q)));
  const at = rows.indexOf(id);
  if (at > 0) rows.unshift(...rows.splice(at, 1));
  return rows;
}

// The index opens sorted by the output score, highest first, where make label computed it: of the cheap
// predictors of steering it ranks best (BENCHMARKS.md, steer-features), so the dials worth trying come first.
function defaultSort(data) {
  return (data.output || []).some((x) => x !== null) ? "output" : "index";
}

function readState(params, data) {
  const sort = SORTABLE[params.get("sort")] ? params.get("sort") : defaultSort(data);
  const show = SHOW.includes(params.get("show")) ? params.get("show") : "all";
  // numbers sort highest first unless the address says otherwise; feature indices lowest first
  const desc = params.has("desc") ? params.get("desc") === "1" : sort !== "index";
  return { q: params.get("q") ?? "", show, sort, desc, page: Math.max(0, Number(params.get("page") ?? 0) || 0) };
}

function writeState(site, state, data) {
  const params = new URLSearchParams();
  if (state.q) params.set("q", state.q);
  if (state.show !== "all") params.set("show", state.show);
  if (state.sort !== defaultSort(data)) params.set("sort", state.sort);
  if (state.desc !== (state.sort !== "index")) params.set("desc", state.desc ? "1" : "0");
  if (state.page) params.set("page", state.page);
  const hash = `#${site.site}${params.toString() ? `?${params}` : ""}`;
  // replaceState: typing a search should not fill the back button's history.
  if (hash !== location.hash) history.replaceState(null, "", hash);
}

async function siteView(site, params) {
  const data = await getJSON(`data/${site.site}/index.json`);
  if (site.expert_layers?.length) site.experts = await getJSON(`data/${site.site}/experts.json`);
  document.title = `${site.site} · Dialbox features`;
  const state = readState(params, data);
  const search = el("input", { type: "search", id: "search", value: state.q, autocomplete: "off",
    placeholder: `Search labels, tokens, a feature ID (12, ${site.site}/12)`
      + (site.experts ? ` or an expert (${site.experts[0].id})` : "") });
  const show = el("select", { id: "show", "aria-label": "Which features" },
    ...SHOW.map((v) => el("option", { value: v }, v)));
  show.value = state.show;
  const headers = el("tr");
  const body = el("tbody");
  const pager = el("div", { class: "pager" });

  function header(key, label) {
    const button = el("button", { type: "button", class: "sort", "data-sort": key },
      label, state.sort === key ? (state.desc ? " ▼" : " ▲") : "");
    button.addEventListener("click", () => {
      state.desc = state.sort === key ? !state.desc : key !== "index";
      state.sort = key;
      state.page = 0;
      render();
    });
    return el("th", { class: key === "index" ? "" : "num" }, button);
  }

  function row(i) {
    const label = data.label[i] !== null ? featureLink(site.site, i, data.label[i])
      : el("span", { class: "muted" }, data.dead[i] ? "dead" : "unlabelled");
    return el("tr", { class: data.dead[i] ? "dead" : "" },
      el("td", {}, featureLink(site.site, i, String(i))), el("td", { class: "label" }, label),
      el("td", {}, tokenChips(data.top[i])), el("td", { class: "num" }, percent(data.density[i])),
      el("td", { class: "num" }, num(data.max_act[i])), el("td", { class: "num" }, num(data.score[i])),
      outputCell((data.output || [])[i] ?? null, outputPercentiles(data)[i]),
      el("td", { class: "num" }, steerCell((data.steer || [])[i] ?? null, (data.steers || [])[i] ?? null)));
  }

  function render() {
    const rows = matchingRows(site, data, state);
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    headers.replaceChildren(header("index", SORTABLE.index), el("th", {}, "Label"), el("th", {}, "Top tokens"),
      header("density", SORTABLE.density), header("max_act", SORTABLE.max_act), header("score", SORTABLE.score),
      header("output", SORTABLE.output), header("steer", SORTABLE.steer));
    body.replaceChildren(...rows.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).map(row));
    pager.replaceChildren(pageButton("‹ Prev", state.page - 1, pages), el("span", { id: "page-info" },
      `Page ${state.page + 1} of ${pages} · ${count(rows.length)} features`), pageButton("Next ›", state.page + 1, pages));
    writeState(site, state, data);
    performance.mark("index-rendered"); // open time, for devtools and the 65,536-feature browser test
  }

  function pageButton(text, page, pages) {
    const button = el("button", { type: "button" }, text);
    button.disabled = page < 0 || page >= pages;
    button.addEventListener("click", () => { state.page = page; render(); window.scrollTo(0, 0); });
    return button;
  }

  search.addEventListener("input", () => { state.q = search.value; state.page = 0; render(); });
  show.addEventListener("change", () => { state.show = show.value; state.page = 0; render(); });
  render();
  const expertsLink = site.experts ? el("a", { href: `#${site.site}/experts`, id: "experts-link" }, "Experts") : null;
  return el("section", {}, el("h1", {}, site.site), siteSummary(site),
    el("div", { class: "controls" }, search, show, expertsLink),
    el("table", { class: "grid features", id: "feature-table" }, el("thead", {}, headers), body), pager);
}

// ---- one feature ----------------------------------------------------------------------------

async function featureView(site, index, chunkSize) {
  if (!Number.isInteger(index) || index < 0 || index >= site.n_features) {
    throw new Error(`${site.site} has no feature ${index}: its features are 0..${site.n_features - 1}`);
  }
  const chunk = await getJSON(`data/${site.site}/chunk-${Math.floor(index / chunkSize)}.json`);
  const f = chunk.find((x) => x.index === index);
  document.title = `${f.id} · Dialbox features`;
  const nav = el("nav", { class: "crumbs" }, el("a", { href: `#${site.site}` }, `← ${site.site} index`),
    index > 0 ? featureLink(site.site, index - 1, "‹ previous") : null,
    index + 1 < site.n_features ? featureLink(site.site, index + 1, "next ›") : null);
  return el("article", { class: "feature" }, nav, idHeading(f.id), labelBlock(f, site),
    el("section", {}, el("h2", {}, "Activations"), stats(f, site), histogram(f.hist_counts, site.hist_edges)),
    el("div", { class: "columns" }, logitTable("Promoted tokens", f.logit_pos),
      logitTable("Suppressed tokens", f.logit_neg), neighbours(site.site, f.neighbours)),
    steerPanel(f), steeringBlock(f), expertsBlock(f, site), contexts(f));
}

// ---- steering from the page (make browse serves the steering API beside the report) -------------

const STEER_OPS = ["add", "clamp"];

// Prompt, interventions (this feature first, more can be added), max tokens; the unsteered, the prompt
// baseline's (once the feature was evaluated) and the steered continuation stream side by side. Without an API behind the page it says how to start one.
function steerPanel(f) {
  const calibrated = STEER_OPS.includes(f.steer_op) && f.steer_scale !== null && f.steer_scale !== undefined;
  const prompt = el("input", { type: "text", id: "steer-prompt", value: "Tell me about", "aria-label": "Prompt" });
  const rows = el("div", { id: "steer-rows" });
  const tokens = el("input", { type: "number", id: "steer-tokens", value: "32", min: "1", "aria-label": "Max tokens" });
  const button = el("button", { type: "button", id: "steer-go" }, "Steer");
  const more = el("button", { type: "button", id: "steer-more" }, "+ feature");
  const plain = el("p", { class: "generated", id: "steer-plain" });
  const steered = el("p", { class: "generated", id: "steer-steered" });
  const status = el("p", { class: "muted", id: "steer-status" });
  // this feature's row starts at its best dial: the tuned one, or the decoder row at its calibrated setting
  if (f.steer_dial === "tuned") rows.append(steerRow(f.id, "tuned", "", null));
  else rows.append(steerRow(f.id, calibrated ? f.steer_op : "add", calibrated ? f.steer_scale : "",
    calibrated ? f.steer_units : null, calibrated ? f.steer_positions : null));
  // the prompt baseline streams beside them where the feature was evaluated: the bar a dial has to beat
  const instruction = f.steering?.baseline_instruction;
  const baseline = el("p", { class: "generated", id: "steer-baseline" });
  more.addEventListener("click", () => rows.append(steerRow("", "add", "", null)));
  button.addEventListener("click", async () => {
    button.disabled = true;
    plain.textContent = steered.textContent = baseline.textContent = status.textContent = "";
    const body = { prompt: prompt.value, max_tokens: Number(tokens.value), temperature: 0, stream: true };
    const streams = [streamInto(plain, body), streamInto(steered, { ...body, steering: interventions(rows) })];
    if (instruction) streams.push(streamInto(baseline, { ...body, prompt: `${prompt.value} ${instruction}` }));
    try {
      await Promise.all(streams);
    } catch (err) {
      status.textContent = String(err.message);
    }
    button.disabled = false;
  });
  const panel = el("section", { id: "steer" }, el("h2", {}, "Steer"),
    el("div", { class: "steer-controls" }, el("label", {}, "Prompt ", prompt), rows, more,
      el("label", {}, "Max tokens ", tokens), button),
    status, el("div", { class: "columns" }, el("div", {}, el("h3", {}, "Unsteered"), plain),
      instruction ? el("div", {}, el("h3", {}, `Prompt baseline (+ "${instruction}")`), baseline) : null,
      el("div", {}, el("h3", {}, "Steered"), steered)));
  apiAvailable().then((ok) => {
    if (ok) return;
    panel.querySelector(".steer-controls").remove();
    status.id = "steer-hint";
    status.textContent = "This copy of the report has no steering API behind it. To steer from this page, serve it "
      + "with the run's model: `make browse RUN=<run>` (the report and the API on one 127.0.0.1 port), or steer from "
      + `the command line: make steer ARGS='steer.interventions=["${f.id} scale=4"]'.`;
  });
  return panel;
}

// One intervention: a feature ID, add or clamp (its decoder row) or its tuned dial, and a scale (empty: the
// calibrated or default setting; for the tuned dial, a multiple of it as tuned).
function steerRow(id, op, scale, units, positions) {
  const feature = el("input", { type: "text", class: "steer-feature", value: id, placeholder: "L3.resid_post/12",
    "aria-label": "Feature" });
  const select = el("select", { class: "steer-op", "aria-label": "Op" }, ...STEER_OPS.map((o) => el("option", { value: o }, o)),
    el("option", { value: "tuned" }, "tuned dial"));
  select.value = op;
  const amount = el("input", { type: "number", class: "steer-scale", step: "any", value: String(scale),
    placeholder: "default", "aria-label": "Scale" });
  const row = el("div", { class: "steer-row" }, feature, select, amount);
  if (units) row.dataset.units = units; // a calibrated scale is in its own units ...
  if (positions) row.dataset.positions = positions; // ... and acts where it was calibrated (the prompt, or all)
  return row;
}

function interventions(rows) {
  return [...rows.querySelectorAll(".steer-row")].filter((r) => r.querySelector(".steer-feature").value.trim())
    .map((r) => {
      const op = r.querySelector(".steer-op").value;
      const iv = { feature: r.querySelector(".steer-feature").value.trim(), ...(op === "tuned" ? { dial: "tuned" } : { op }) };
      const scale = r.querySelector(".steer-scale").value;
      if (scale !== "") iv.scale = Number(scale);
      if (scale !== "" && r.dataset.units) iv.units = r.dataset.units;
      if (scale !== "" && r.dataset.positions) iv.positions = r.dataset.positions;
      return iv;
    });
}

let api = null; // a promise: whether the steering API answers beside the report
function apiAvailable() {
  api ??= fetch("v1/models").then((r) => r.ok && r.headers.get("Content-Type") === "application/json")
    .catch(() => false);
  return api;
}

// POST a streaming completion and append its text to `node` as it comes (as text, never as HTML).
async function streamInto(node, body) {
  const response = await fetch("v1/completions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error(error.error?.message || `the steering API answered HTTP ${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data !== "[DONE]") node.append(JSON.parse(data).choices[0].text || "");
    }
  }
}

// make steer-features' verdict in the index: the score, marked when the feature steers.
function steerCell(score, steers) {
  if (score === null) return "";
  return el("span", { class: steers ? "steers" : "muted", title: steers ? "steers" : "does not steer" },
    `${num(score)}${steers ? " ✓" : ""}`);
}

function interval(ci) {
  return ci && ci.length === 2 ? ` [${num(ci[0])}, ${num(ci[1])}]` : "";
}

// How the feature steers (make steer-features): the setting chosen on dev prompts, the test scores
// with their 95% intervals, and two test prompts unsteered next to steered. All text is textContent.
function steeringBlock(f) {
  const s = f.steering;
  const title = el("h2", {}, "Steering");
  if (!s) {
    const output = f.output_score === null || f.output_score === undefined ? ""
      : ` Its output score is ${num(f.output_score)} (how much adding it raises its promoted tokens).`;
    return el("section", { id: "steering" }, title, el("p", { class: "muted" },
      `Not evaluated: run \`make steer-features ARGS='steer_features.features=[${f.id}]'\`.${output}`));
  }
  const verdict = s.steers ? `Steers visibly with its ${s.dial} dial` : "Does not steer visibly";
  // One column per condition: the unsteered model, the prompt baseline (the bar to beat), then each dial.
  const conditions = [{ name: "Unsteered", ...s.unsteered }, { name: "Prompt baseline", ...s.baseline },
    ...s.dials.map((d) => ({ name: `${d.dial} dial${d.dial === s.dial ? " (default)" : ""}`, ...d }))];
  const rows = [
    ["Setting (chosen on dev prompts)", (c) => c.setting ?? (c.name === "Prompt baseline" ? `"${s.baseline_instruction}"` : "–")],
    ["Answers with the concept", (c) => percent(c.presence)],
    ["Gain over unsteered [95% CI]", (c) => c.presence_gain === undefined ? "–"
      : `${num(c.presence_gain)}${interval(c.presence_gain_ci95)}`],
    [`Gain over a random feature (${s.control_feature})`, (c) => num(c.presence_over_control ?? null)],
    ["Gain over the prompt baseline", (c) => num(c.presence_over_baseline ?? null)],
    ["Answer tokens where it fires", (c) => percent(c.concept)],
    ["Perplexity / unsteered", (c) => num(c.perplexity_ratio ?? null)],
    ["Repeated 4-grams", (c) => percent(c.repeats ?? null)],
    ["Steers visibly", (c) => (c.visibly === undefined ? "–" : c.visibly ? "yes" : "no")],
  ];
  const table = el("table", { class: "grid", id: "dials" },
    el("thead", {}, el("tr", {}, el("th", {}, ""), ...conditions.map((c) => el("th", {}, c.name)))),
    el("tbody", {}, ...rows.map(([k, cell]) => el("tr", {}, el("th", {}, k),
      ...conditions.map((c) => el("td", {}, cell(c)))))));
  const answers = [["unsteered", "Unsteered"], ["baseline", "Prompt baseline"],
    ...s.dials.map((d) => [d.dial, `${d.dial} dial`])];
  const examples = (s.examples || []).map((e) => el("div", { class: "steer-example" },
    el("h3", {}, `Prompt: ${e.prompt}`),
    el("div", { class: "columns" }, ...answers.map(([key, name]) =>
      el("div", {}, el("h4", {}, name), el("p", { class: "generated" }, e[key] ?? ""))))));
  const reason = s.tuned_reason ? el("p", { class: "muted" }, `No tuned dial: ${s.tuned_reason}.`) : null;
  return el("section", { id: "steering" }, title,
    el("p", { class: s.steers ? "status steers" : "status" }, `${verdict} on ${s.prompts} test prompts. `
      + (!s.criteria ? "" : `An answer has the concept when the feature fires on one of its tokens at ${s.criteria.presence} x its max `
      + `activation or more; a dial steers visibly when that share rises by ${s.criteria.min_presence_gain} over `
      + `unsteered and over the random feature, within ${s.criteria.max_ppl_ratio}x perplexity.`)),
    table, reason, ...examples);
}

// The ID is what the steering CLI and server take: one click copies it.
function idHeading(id) {
  const code = el("code", { id: "feature-id" }, id);
  const button = el("button", { type: "button", id: "copy-id", title: "Copy the feature ID, for steering" },
    "Copy ID");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(id);
      button.textContent = "Copied";
    } catch {
      // No clipboard (plain http off localhost): select the ID for Ctrl+C instead.
      getSelection().selectAllChildren(code);
      button.textContent = "Press Ctrl+C";
    }
  });
  return el("h1", {}, code, " ", button);
}

function labelBlock(f, site) {
  if (f.dead) {
    return el("p", { class: "status dead" },
      `Dead: never fired on the ${count(site.tokens_mined)} mined tokens, so it has no label.`);
  }
  if (f.label === null) {
    return el("p", { class: "status unlabelled" }, `Unlabelled: ${f.label_error ?? "no reason recorded"}`);
  }
  const score = f.score === null ? "not scored"
    : `score ${num(f.score)} (detection ${num(f.detection)}, fuzzing ${num(f.fuzzing)})`;
  return el("div", {}, el("p", { class: "label", id: "feature-label" }, f.label),
    el("p", { class: "muted" }, `label from ${f.label_source} · ${score}`));
}

function stats(f, site) {
  const output = f.output_score === null || f.output_score === undefined ? "" : ` · output score ${num(f.output_score)}`;
  return el("p", {}, `Density ${percent(f.density)} of ${count(site.tokens_mined)} tokens · `
    + `max activation ${num(f.max_act)} · mean when firing ${num(f.mean_act)}${output}`);
}

// Bars over log-spaced bins, heights on a log scale so the tail shows beside the bulk. The
// site-wide bins span many decades: draw only those from the feature's first to last non-empty one.
function histogram(allCounts, allEdges) {
  const used = allCounts.flatMap((c, i) => (c > 0 ? [i] : []));
  const [lo, hi] = used.length ? [used[0], used[used.length - 1] + 1] : [0, allCounts.length];
  const counts = allCounts.slice(lo, hi), edges = allEdges.slice(lo, hi + 1);
  const width = 640, height = 110, bar = width / counts.length;
  const top = Math.log1p(Math.max(1, ...counts));
  const chart = svg("svg", { class: "hist", viewBox: `0 0 ${width} ${height + 18}`, role: "img",
    "aria-label": "activation histogram" });
  counts.forEach((n, i) => {
    const h = (height * Math.log1p(n)) / top;
    chart.append(svg("rect", { x: i * bar + 0.5, y: height - h, width: Math.max(bar - 1, 0.5), height: h },
      svg("title", {}, `${num(edges[i])} – ${num(edges[i + 1])}: ${count(n)} tokens`)));
  });
  chart.append(svg("text", { x: 0, y: height + 14 }, num(edges[0])),
    svg("text", { x: width / 2, y: height + 14, "text-anchor": "middle" }, "activation (log scale)"),
    svg("text", { x: width, y: height + 14, "text-anchor": "end" }, num(edges[edges.length - 1])));
  return chart;
}

function logitTable(title, pairs) {
  return el("section", {}, el("h2", {}, title), el("table", { class: "grid logits" }, el("tbody", {},
    ...pairs.map(([token, value]) => el("tr", {},
      el("td", {}, tokenChips([token])), el("td", { class: "num" }, num(value)))))));
}

function neighbours(site, list) {
  return el("section", {}, el("h2", {}, "Nearest features"), el("ul", { class: "neighbours" },
    ...list.map(([index, cos, label]) => el("li", {}, featureLink(site, index), " ",
      el("span", { class: "muted" }, `cos ${num(cos)}`), " ", label ?? el("span", { class: "muted" }, "no label")))));
}

function contexts(f) {
  const { top, quantile, random } = f.examples;
  const byQuantile = Map.groupBy(quantile, (e) => e.quantile);
  return el("section", { class: "contexts" },
    el("h2", {}, "Top activations"), ...top.map((e) => context(e, f.max_act)),
    ...[...byQuantile].flatMap(([q, rows]) => [el("h3", {}, `Quantile ${q}`),
      ...rows.map((e) => context(e, f.max_act))]),
    random.length ? el("details", {}, el("summary", {}, `Contexts where it does not fire (${random.length})`),
      ...random.map((e) => context(e, f.max_act))) : null);
}

// One context; each token's background is its activation relative to the feature's maximum.
function context(example, maxAct) {
  const tokens = example.tokens.map((token, i) => {
    const act = example.acts[i];
    const span = el("span", { class: "tok", title: `${shown(token)} · activation ${num(act)}` }, shown(token));
    if (act > 0 && maxAct > 0) {
      span.classList.add("on");
      span.style.backgroundColor = `rgba(255, 120, 0, ${Math.min(1, 0.1 + (0.9 * act) / maxAct).toFixed(3)})`;
    }
    return span;
  });
  const split = example.split ? el("span", { class: `split ${example.split}`,
    title: example.split === "explain" ? "shown to the explainer" : "used by the scorer" }, example.split) : null;
  return el("div", { class: "context" },
    el("span", { class: "peak" }, num(example.max_act), split), el("span", { class: "text" }, ...tokens));
}

// ---- experts (MoE runs whose routing was harvested) -------------------------------------------

function expertQuery(site, q) {
  if (!site.experts || !/^L\d+\/E\d+$/i.test(q)) return null;
  return site.experts.find((e) => e.id.toLowerCase() === q.toLowerCase()) ?? { features: [] };
}

function expertLink(site, id) {
  return el("a", { href: `#${site}/experts?e=${encodeURIComponent(id)}` }, id);
}

// The feature's top experts by lift: bars of the lift, with the numbers beside them.
function expertsBlock(f, site) {
  if (!f.experts) return null;
  const top = Math.max(1, ...f.experts.map(([, lift]) => lift));
  const rows = f.experts.map(([id, lift, low, n]) => el("tr", {},
    el("td", {}, expertLink(site.site, id)),
    el("td", { class: "bar" }, el("span", { class: "expert-bar", style: `width: ${(100 * lift / top).toFixed(1)}%` })),
    el("td", { class: "num" }, `×${num(lift)}`), el("td", { class: "num muted" }, `≥ ×${num(low)}`),
    el("td", { class: "num" }, count(n))));
  const entropy = site.expert_layers.map((layer, i) => `L${layer} ${num(f.expert_entropy[i])} bits`).join(" · ");
  return el("section", { class: "experts" }, el("h2", {}, "Experts"),
    el("p", { class: "muted" }, "Lift = P(expert | feature fires) / P(expert); ranked by its 95% lower bound. "
      + `Entropy of its experts: ${entropy}. `, el("a", { href: `#${site.site}/experts` }, "All experts")),
    el("table", { class: "grid experts", id: "expert-table" }, el("thead", {}, el("tr", {},
      ...["Expert", "Lift", "", "Lower bound", "Tokens"].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
}

// Every counted expert of the site: its load, and the features that most select it.
async function expertsView(site, focus) {
  if (!site.expert_layers?.length) throw new Error(`${site.site} has no expert counts: harvest with harvest.router=true`);
  const experts = await getJSON(`data/${site.site}/experts.json`);
  document.title = `${site.site} experts · Dialbox features`;
  const listed = focus ? experts.filter((e) => e.id.toLowerCase() === focus.toLowerCase()) : experts;
  if (focus && !listed.length) throw new Error(`${site.site} counts no expert ${focus}`);
  const sections = listed.map((e) => el("section", { class: "expert", id: e.id },
    el("h2", {}, expertLink(site.site, e.id), el("span", { class: "muted" },
      ` load ${percent(e.load_frac)} of tokens (${count(e.load)})`)),
    el("table", { class: "grid" }, el("tbody", {}, ...e.features.map(([index, lift, low, n, label]) => el("tr", {},
      el("td", {}, featureLink(site.site, index)), el("td", { class: "num" }, `×${num(lift)}`),
      el("td", { class: "num muted" }, `≥ ×${num(low)}`), el("td", { class: "num" }, count(n)),
      el("td", { class: "label" }, label ?? el("span", { class: "muted" }, "no label"))))))));
  const nav = el("nav", { class: "crumbs" }, el("a", { href: `#${site.site}` }, `← ${site.site} index`),
    focus ? el("a", { href: `#${site.site}/experts` }, "all experts") : null);
  return el("article", {}, nav, el("h1", {}, `${site.site} · experts`), el("p", { class: "muted" },
    `Routed layers ${site.expert_layers.join(", ")}: each expert's share of tokens and the features that `
    + "most select it (lift, its 95% lower bound, tokens together)."), ...sections);
}

window.addEventListener("hashchange", route);
route();
