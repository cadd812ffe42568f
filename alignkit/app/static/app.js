// alignkit's pages: labelling and the arena. Plain JavaScript, no build step, nothing from a CDN.
"use strict";
const alignkit = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // A fresh key per decision, reused by every retry of it: the server stores the decision once.
  function newKey() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  // JSON request; network failures and 5xx are retried (with the same idempotency key) before giving up.
  async function api(method, url, body, key) {
    const headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
    if (key) headers["Idempotency-Key"] = key;
    const retriable = method === "GET" || Boolean(key);
    for (let attempt = 0; ; attempt++) {
      let r;
      try {
        r = await fetch(url, { method, headers, credentials: "same-origin",
                               body: body === undefined ? undefined : JSON.stringify(body) });
      } catch (e) {
        if (retriable && attempt < 6) { await sleep(300 * 2 ** attempt); continue; }
        throw new Error("the server cannot be reached; your last choice is kept, try again");
      }
      if (r.status >= 500 && retriable && attempt < 6) { await sleep(300 * 2 ** attempt); continue; }
      const data = await r.json().catch(() => ({}));
      if (r.status === 401) { window.location = "/login"; throw new Error("logged out"); }
      if (!r.ok) throw new Error(data.detail || `${r.status} ${r.statusText}`);
      return data;
    }
  }

  function typing(event) {
    const t = event.target;
    return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT");
  }

  function card(title, text, extraClass) {
    const div = document.createElement("div");
    div.className = "response" + (extraClass ? " " + extraClass : "");
    const h = document.createElement("h3");
    h.textContent = title;
    const pre = document.createElement("pre");
    pre.textContent = text;  // textContent: model output is never parsed as HTML
    div.append(h, pre);
    return div;
  }

  function button(label, onClick, data) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    if (data) b.dataset.choice = data;
    b.addEventListener("click", onClick);
    return b;
  }

  // ------------------------------------------------------------ labelling
  function label() {
    const task = $("task");
    const campaign = task.dataset.campaign, kind = task.dataset.kind;
    const base = `/api/campaigns/${encodeURIComponent(campaign)}`;
    const pairwise = [["A", "1 · A is better"], ["B", "2 · B is better"], ["tie", "3 · Tie"], ["both_bad", "4 · Both are bad"]];
    const thumbs = [["up", "1 · Thumbs up"], ["down", "2 · Thumbs down"]];
    let item = null, choice = null, ranking = [], key = null, shownAt = 0, busy = false;

    function status(text, isError) {
      $("status").textContent = text || "";
      $("status").className = "status" + (isError ? " error" : "");
    }

    function render() {
      $("prompt").textContent = item.prompt;
      $("progress").textContent = `You have judged ${item.done_by_you} item(s) in this campaign.`;
      const responses = $("responses"), controls = $("controls");
      responses.replaceChildren();
      controls.replaceChildren();
      responses.className = "responses" + (item.responses.length === 2 ? " two" : "");
      item.responses.forEach((text, i) => {
        const title = kind === "pairwise" ? (i === 0 ? "A" : "B") : kind === "rank" ? `Answer ${i + 1}` : "Answer";
        const c = card(title, text);
        c.dataset.slot = i;
        if (kind === "rank") {
          const badge = document.createElement("span");
          badge.className = "rank-badge";
          c.querySelector("h3").append(badge);
          c.addEventListener("click", () => pick(i));
        }
        responses.append(c);
      });
      if (kind === "rank") {
        controls.append(button("Clear (Backspace)", () => { ranking = []; show(); }));
        $("keys").textContent = `Press the answers' numbers from best to worst (1–${item.responses.length}), then Enter to submit. Backspace clears.`;
      } else {
        for (const [value, text] of kind === "pairwise" ? pairwise : thumbs) {
          controls.append(button(text, () => { choice = value; show(); }, value));
        }
        $("keys").textContent = kind === "pairwise" ? "Keys: 1 / 2 / 3 / 4 choose, Enter submits." : "Keys: 1 / 2 choose, Enter submits.";
      }
      const submitButton = button("Submit (Enter)", submit);
      submitButton.id = "submit";
      controls.append(submitButton);
      show();
    }

    function complete() {
      return kind === "rank" ? ranking.length === item.responses.length : choice !== null;
    }

    function show() {
      for (const b of $("controls").querySelectorAll("button[data-choice]")) {
        b.classList.toggle("selected", b.dataset.choice === choice);
      }
      if (kind === "rank") {
        for (const c of $("responses").children) {
          const place = ranking.indexOf(Number(c.dataset.slot));
          c.querySelector(".rank-badge").textContent = place >= 0 ? `#${place + 1}` : "";
          c.classList.toggle("selected", place >= 0);
        }
      }
      $("submit").disabled = !complete();
    }

    function pick(slot) {
      if (slot < 0 || slot >= item.responses.length || ranking.includes(slot)) return;
      ranking.push(slot);
      if (ranking.length === item.responses.length - 1) {  // the last one is the worst: no key needed
        ranking.push([...item.responses.keys()].find((s) => !ranking.includes(s)));
      }
      show();
    }

    async function load() {
      status("");
      const data = await api("GET", `${base}/next`);
      item = data.item;
      choice = null; ranking = []; key = newKey(); shownAt = performance.now();
      if (!item) { task.hidden = true; $("finished").hidden = false; return; }
      render();
    }

    async function submit() {
      if (busy || !item || !complete()) return;
      busy = true;
      status("Saving…");
      const body = { item_id: item.item_id, seconds: (performance.now() - shownAt) / 1000 };
      if (kind === "rank") body.ranking = ranking; else body.choice = choice;
      try {
        await api("POST", `${base}/judgements`, body, key);
        await load();
        status("Saved.");
      } catch (e) {
        status(e.message, true);
      } finally {
        busy = false;
      }
    }

    document.addEventListener("keydown", (event) => {
      if (!item || typing(event) || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "Enter") { event.preventDefault(); submit(); return; }
      if (kind === "rank") {
        if (event.key === "Backspace" || event.key === "Escape") { ranking = []; show(); return; }
        const n = Number(event.key);
        if (Number.isInteger(n) && n >= 1) pick(n - 1);
        return;
      }
      const options = kind === "pairwise" ? pairwise : thumbs;
      const n = Number(event.key);
      if (Number.isInteger(n) && n >= 1 && n <= options.length) { choice = options[n - 1][0]; show(); }
    });
    load().catch((e) => status(e.message, true));
  }

  // ------------------------------------------------------------ arena
  function arena() {
    const form = $("battle-form");
    if (!form) return;
    let battle = null, voted = false, key = null, busy = false;

    function status(text, isError) {
      $("status").textContent = text || "";
      $("status").className = "status" + (isError ? " error" : "");
    }

    async function start() {
      if (busy) return;
      busy = true;
      status("The models are answering…");
      try {
        battle = await api("POST", "/api/arena/battles", { prompt: $("arena-prompt").value.trim() });
        voted = false; key = newKey();
        $("battle-prompt").textContent = battle.prompt;
        $("answer-a").textContent = battle.responses[0];
        $("answer-b").textContent = battle.responses[1];
        $("name-a").textContent = "Model A";
        $("name-b").textContent = "Model B";
        for (const b of $("vote-buttons").querySelectorAll("button")) { b.disabled = false; b.classList.remove("selected"); }
        $("battle").hidden = false;
        status("");
      } catch (e) {
        status(e.message, true);
      } finally {
        busy = false;
      }
    }

    async function cast(vote) {
      if (!battle || voted || busy) return;
      busy = true;
      try {
        const r = await api("POST", `/api/arena/battles/${battle.battle_id}/vote`, { vote }, key);
        voted = true;
        $("name-a").textContent = `Model A: ${r.model_a}`;
        $("name-b").textContent = `Model B: ${r.model_b}`;
        for (const b of $("vote-buttons").querySelectorAll("button")) {
          b.disabled = true;
          b.classList.toggle("selected", b.dataset.vote === vote);
        }
        status("Vote saved. Enter (or New battle) for the next one.");
      } catch (e) {
        status(e.message, true);
      } finally {
        busy = false;
      }
    }

    form.addEventListener("submit", (event) => { event.preventDefault(); start(); });
    for (const b of $("vote-buttons").querySelectorAll("button")) b.addEventListener("click", () => cast(b.dataset.vote));
    document.addEventListener("keydown", (event) => {
      if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) return;
      const votes = { 1: "A", 2: "B", 3: "tie", 4: "both_bad" };
      if (votes[event.key]) cast(votes[event.key]);
      else if (event.key === "Enter" && (voted || !battle)) { event.preventDefault(); start(); }
    });
  }

  return { label, arena };
})();
