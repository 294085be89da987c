// The rnngen page: a form that streams lyrics from this server's /v1/completions (server-sent events).
// Plain JavaScript, no build step and nothing fetched from elsewhere: it works offline.
"use strict";

const TEXT = {
  zh: {
    tagline: "写歌词", seed: "开头", seedHint: "例如：春风（可留空）", shape: "篇幅", byLength: "按字数", byLines: "按行",
    length: "字数", lines: "行数", lineLength: "每行字数", lineLengthHint: "7 或 5,7,5", acrostic: "藏头（开头留空）",
    acrosticHint: "春夏秋冬", rhyme: "押韵", noRhyme: "不押韵", temperature: "温度", model: "模型",
    randomSeed: "随机种子", randomHint: "随机", apiKey: "API 密钥", generate: "生成", stop: "停止", copy: "复制",
    copied: "已复制", footer: "由 rnngen 在本机生成。接口与 OpenAI 的 /v1/completions 兼容。",
    writing: "正在写……", done: "完成", stopped: "已停止", chars: "字", seedUsed: "随机种子",
    needKey: "此服务器需要 API 密钥。", noModels: "没有可用的模型", network: "连接失败：",
    verseForm: "体裁", freeLyrics: "自由歌词", shi: "近体诗", ci: "词", candidates: "每句候选数",
    keywords: "关键词", keywordsHint: "春风,明月（逗号分隔）",
  },
  en: {
    tagline: "lyrics writer", seed: "Seed", seedHint: "e.g. 春风 (may be empty)", shape: "Length", byLength: "Characters",
    byLines: "Lines", length: "Characters", lines: "Lines", lineLength: "Characters per line",
    lineLengthHint: "7 or 5,7,5", acrostic: "Acrostic (leave the seed empty)", acrosticHint: "春夏秋冬", rhyme: "Rhyme",
    noRhyme: "none", temperature: "Temperature", model: "Model", randomSeed: "Random seed", randomHint: "random",
    apiKey: "API key", generate: "Generate", stop: "Stop", copy: "Copy", copied: "Copied",
    footer: "Written by rnngen on this machine. The API speaks OpenAI's /v1/completions.",
    writing: "Writing…", done: "Done", stopped: "Stopped", chars: "characters", seedUsed: "random seed",
    needKey: "This server needs an API key.", noModels: "no models available", network: "Connection failed: ",
    verseForm: "Verse form", freeLyrics: "free lyrics", shi: "Regulated verse (诗)", ci: "Ci (词)",
    candidates: "Candidates per clause", keywords: "Keywords", keywordsHint: "春风,明月 (comma-separated)",
  },
};

const $ = (id) => document.getElementById(id);
let lang = localStorage.getItem("rnngen-lang") ||
  ((navigator.language || "").toLowerCase().startsWith("zh") ? "zh" : "en");
let controller = null;
const forms = new Map();  // name -> the form as /v1/forms describes it

function t(key) { return TEXT[lang][key] || key; }

function applyLanguage() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  document.querySelectorAll("[data-i18n-label]").forEach((el) => { el.label = t(el.dataset.i18nLabel); });
  $("lang").textContent = lang === "zh" ? "English" : "中文";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || sessionStorage.getItem("rnngen-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (e) {
    showError(t("network") + e.message);
    return;
  }
  if (response.status === 401) {
    $("key-box").hidden = false;
    showError(t("needKey"));
    return;
  }
  if (!response.ok) { showError(await errorMessage(response)); return; }
  const list = (await response.json()).data || [];
  const select = $("model");
  select.textContent = "";
  for (const m of list) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    option.dataset.tokenizer = (m.rnngen && m.rnngen.tokenizer) || "";
    select.appendChild(option);
  }
  if (!list.length) showError(t("noModels"));
  else showError("");
}

async function loadForms() {
  let response;
  try {
    response = await fetch("v1/forms", { headers: headers() });
  } catch (e) {
    return;  // loadModels says what went wrong
  }
  if (!response.ok) return;
  const listing = await response.json();
  const chosen = $("verse-form").value;
  forms.clear();
  for (const kind of ["shi", "ci"]) $("forms-" + kind).textContent = "";
  for (const f of listing.data || []) {
    forms.set(f.name, f);
    const option = document.createElement("option");
    option.value = f.name;
    option.textContent = f.aliases.length ? `${f.name}（${f.aliases[0]}）` : f.name;
    ($("forms-" + f.kind) || $("forms-ci")).appendChild(option);
  }
  $("verse-form").value = forms.has(chosen) ? chosen : "";
  $("candidates").max = listing.max_candidates || 64;
  $("candidates").value = listing.default_candidates || 16;
  showForm();
}

function verseForm() { return forms.get($("verse-form").value) || null; }

function body() {
  const b = { model: $("model").value, stream: true, temperature: parseFloat($("temperature").value) };
  const seed = $("random-seed").value.trim();
  if (seed !== "") b.seed = parseInt(seed, 10);
  const keywords = $("keywords").value.trim();
  if (keywords) b.keywords = keywords;
  const form = verseForm();
  if (form) {  // the form sets the clauses, their lengths and rhymes, and writes the whole poem
    b.form = form.name;
    b.candidates = parseInt($("candidates").value, 10);
    const acrostic = $("acrostic").value.trim();
    if (acrostic) b.acrostic = acrostic;
    return b;
  }
  b.prompt = $("seed").value;
  if (document.querySelector("input[name=mode]:checked").value === "length") {
    b.max_tokens = parseInt($("length").value, 10);
  } else {
    const acrostic = $("acrostic").value.trim();
    if (acrostic) b.acrostic = acrostic; else b.lines = parseInt($("lines").value, 10);
    const lineLength = $("line-length").value.trim();
    if (lineLength) b.line_length = lineLength;
    if ($("rhyme").value) b.rhyme = $("rhyme").value;
  }
  return b;
}

function busy(on) {
  $("go").disabled = on;
  $("stop").disabled = !on;
  $("copy").disabled = on || !$("out").textContent;
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  showError("");
  const out = $("out");
  out.textContent = "";
  $("status").textContent = t("writing");
  const request = body();
  controller = new AbortController();
  busy(true);
  const started = performance.now();
  let chars = 0, finish = null;
  try {
    const response = await fetch("v1/completions", { method: "POST", headers: headers(),
                                                     body: JSON.stringify(request), signal: controller.signal });
    if (response.status === 401) $("key-box").hidden = false;
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const c of chunk.choices || []) {
            out.textContent += c.text;
            chars += [...c.text].length;
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = `${t("done")} · ${chars} ${t("chars")} · ${seconds.toFixed(1)} s` +
      (request.seed !== undefined ? ` · ${t("seedUsed")} ${request.seed}` : "") + (finish ? ` · ${finish}` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = `${t("stopped")} · ${chars} ${t("chars")}`;
    } else {
      $("status").textContent = "";
      showError(e.message);
    }
  } finally {
    controller = null;
    busy(false);
  }
}

async function copy() {
  const text = $("out").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // not a secure context (http on another machine): copy through a selection
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy").textContent = t("copied");
  setTimeout(() => { $("copy").textContent = t("copy"); }, 1500);
}

function showMode() {
  const lines = verseForm() !== null || document.querySelector("input[name=mode]:checked").value === "lines";
  $("lines-box").hidden = !lines;
  $("length-box").hidden = lines;
}

// A form sets the lines, their lengths and rhymes, and starts the poem itself: the options that set
// them otherwise are hidden and disabled (the acrostic and the keywords stay); its pattern shows.
function showForm() {
  const form = verseForm();
  document.querySelectorAll(".free-only").forEach((el) => {
    el.hidden = form !== null;
    el.querySelectorAll("input, select, textarea").forEach((input) => { input.disabled = form !== null; });
  });
  $("pattern").textContent = form ? form.pattern : "";
  $("pattern").hidden = !form;
  $("candidates-box").hidden = !form;
  $("candidates").disabled = !form;
  showMode();
}

document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", showMode));
$("verse-form").addEventListener("change", showForm);
$("temperature").addEventListener("input", () => { $("temp-value").textContent = $("temperature").value; });
$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("copy").addEventListener("click", copy);
$("lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("rnngen-lang", lang);
  applyLanguage();
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("rnngen-key", $("api-key").value.trim());
  loadModels();
  loadForms();
});
applyLanguage();
showForm();
loadModels();
loadForms();
