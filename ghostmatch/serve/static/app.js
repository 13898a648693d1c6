// The ghostmatch page: search by a photo, review duplicate groups. Every file name goes
// into the page as text (textContent), never as HTML.
"use strict";

const API = "/api/v1";
const PAGE = 10;
const state = { offset: 0, total: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function say(message, ok) {
  const status = $("status");
  status.textContent = message;
  status.className = ok ? "ok" : "";
}

async function call(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body instanceof FormData) {
    options.body = body;
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail || response.status);
    throw new Error(text);
  }
  return data;
}

function megabytes(bytes) { return (bytes / 1e6).toFixed(2) + " MB"; }

function count(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

function thumb(id) {
  return el("img", { src: `${API}/images/${id}/thumbnail?size=256`, alt: "", loading: "lazy" });
}

// ---------------------------------------------------------------- search

function resultCard(match) {
  const card = el("div", { className: "card", title: "search by this photo" },
    thumb(match.id),
    el("div", { className: "score" }, match.score.toFixed(4)),
    el("div", { className: "path" }, match.path),
    el("div", { className: "meta" },
      `${match.width}x${match.height}, ${megabytes(match.bytes)}`));
  card.addEventListener("click", () => searchPath(match.path));
  return card;
}

function showResults(answer) {
  $("query-name").textContent = answer.query;
  const grid = $("results");
  grid.replaceChildren(...answer.matches.map(resultCard));
  say(answer.matches.length ? `${answer.matches.length} matches` : "no matches", true);
}

async function searchFile(file) {
  if (!file) return;
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file, file.name || "pasted image");
  say("searching...", true);
  try {
    showResults(await call("POST", "/query?k=24", form));
  } catch (error) {
    say(error.message);
  }
}

async function searchPath(path) {
  $("query-preview").hidden = true;
  say("searching...", true);
  try {
    showResults(await call("POST", "/query?k=24", { path }));
    showView("search");
  } catch (error) {
    say(error.message);
  }
}

function setUpSearch() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (event) => searchFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    const image = files.find((f) => f.type.startsWith("image/"));
    if (image) searchFile(image);
  });
}

// ---------------------------------------------------------------- duplicates

function memberCard(member, kept, gone) {
  const card = el("div", { className: "card" + (kept ? " kept" : "") + (gone ? " missing" : "") },
    el("div", { className: "label" }, kept ? "kept" : `${member.tier} ${member.score.toFixed(4)}`),
    thumb(member.id),
    el("div", { className: "path" }, member.path),
    el("div", { className: "meta" },
      `${member.width}x${member.height}, ${megabytes(member.bytes)}`));
  return card;
}

function groupView(group) {
  // The page may choose another kept file; the copies are then all the others.
  let keep = group.keep;
  let members = group.members.slice();
  // Files not on disk now: trashed here, or moved away since the index was made.
  const gone = new Set([group.keep, ...group.members].filter((m) => !m.exists).map((m) => m.id));
  const box = el("div", { className: "group" });
  const row = el("div", { className: "row" });
  const actions = el("div", { className: "actions" });
  const trash = el("button", { type: "button", className: "trash" }, "trash the copies");
  actions.append(trash);
  box.append(row, actions);

  function render() {
    const cards = [memberCard(keep, true, gone.has(keep.id))];
    for (const member of members) {
      const card = memberCard(member, false, gone.has(member.id));
      cards.push(card);
      if (gone.size) continue;  // no choices while copies are in the trash
      const instead = el("button", { type: "button", className: "keep-instead" }, "keep this one instead");
      instead.addEventListener("click", () => {
        members = members.filter((m) => m !== member).concat([keep]);
        keep = member;
        render();
      });
      const notDup = el("button", { type: "button", className: "not-dup" }, "not a duplicate");
      notDup.addEventListener("click", async () => {
        try {
          await call("POST", "/not-duplicate", { a: keep.id, b: member.id });
          members = members.filter((m) => m !== member);
          say("recorded: not a duplicate", true);
          if (!members.length) actions.replaceChildren(el("span", { className: "done" }, "no copies left"));
          render();
        } catch (error) { say(error.message); }
      });
      card.append(el("div", {}, instead), el("div", {}, notDup));
    }
    row.replaceChildren(...cards);
  }

  trash.addEventListener("click", async () => {
    trash.disabled = true;
    try {
      const report = await call("POST", "/actions", {
        op: "delete", groups: [{ keep: keep.id, copies: members.map((m) => m.id) }],
      });
      const failed = report.failed.length ? `, ${report.failed.length} left (changed or missing)` : "";
      const undo = el("button", { type: "button", className: "undo" }, "undo");
      const trashed = count(report.done.length, "copy", "copies");
      actions.replaceChildren(el("span", { className: "done" }, `trashed ${trashed}${failed}`), undo);
      say(`trashed ${trashed} (${megabytes(report.bytes)})`, true);
      const bySource = new Map(members.map((m) => [m.path, m.id]));
      for (const action of report.done) gone.add(bySource.get(action.source));
      render();
      undo.addEventListener("click", async () => {
        undo.disabled = true;
        try {
          const back = await call("POST", "/undo", { journal: report.journal });
          const restored = count(back.restored.length, "file", "files");
          actions.replaceChildren(el("span", { className: "done" }, `restored ${restored}`), trash);
          trash.disabled = false;
          const bySourcePath = new Map(members.map((m) => [m.path, m.id]));
          for (const path of back.restored) gone.delete(bySourcePath.get(path));
          render();
          say(`restored ${restored}`, true);
        } catch (error) { undo.disabled = false; say(error.message); }
      });
    } catch (error) {
      trash.disabled = false;
      say(error.message);
    }
  });
  render();
  return box;
}

async function loadGroups() {
  say("finding duplicates...", true);
  try {
    const page = await call("GET", `/duplicates?offset=${state.offset}&limit=${PAGE}`);
    state.total = page.total;
    $("groups").replaceChildren(...page.groups.map(groupView));
    const last = Math.min(page.offset + page.groups.length, page.total);
    $("page-label").textContent = page.total
      ? `groups ${page.offset + 1}-${last} of ${page.total}`
      : "no duplicate groups";
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.total;
    say(`${page.total} groups (threshold ${page.threshold.toFixed(3)})`, true);
  } catch (error) {
    say(error.message);
  }
}

// ---------------------------------------------------------------- views

function showView(name) {
  $("view-search").hidden = name !== "search";
  $("view-dupes").hidden = name !== "dupes";
  $("tab-search").classList.toggle("active", name === "search");
  $("tab-dupes").classList.toggle("active", name === "dupes");
}

async function summary() {
  try {
    const health = await call("GET", "/health");
    $("summary").textContent = `${health.images} images in ${health.index}`;
  } catch (error) {
    say(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSearch();
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-dupes").addEventListener("click", () => { showView("dupes"); loadGroups(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadGroups(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadGroups(); });
  summary();
});
