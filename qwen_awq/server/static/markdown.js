/* A small Markdown subset rendered straight to DOM nodes for model replies.
   Model text only ever becomes text nodes (append(string) / textContent): no HTML from the model is parsed,
   so `<script>` or `onerror=` in a reply is shown as the literal characters and never runs. */

const FENCE = /^(\s*)(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const ITEM = /^(\s*)(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
const TABLE_ROW = /^\s*\|.*\|\s*$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
// Groups: 1-2 code span, 3 bold **, 4 bold __, 5 italic *, 6 italic _, 7 strikethrough, 8-9 link or image.
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",
  "__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",
  "(?<!\\w)_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)",
  "~~(?=\\S)([\\s\\S]*?\\S)~~",
  "!?\\[([^\\]\\n]*)\\]\\(\\s*([^()\\s]*)(?:\\s+\"[^\"\\n]*\")?\\s*\\)",
].join("|"), "g");

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Render `text` as a DocumentFragment of block elements (paragraphs, lists, code blocks, ...). */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) i = renderBlock(lines, i, frag);
  return frag;
}

function startsBlock(line, next = "") {
  return FENCE.test(line) || HEADING.test(line) || ITEM.test(line) || QUOTE.test(line) || RULE.test(line)
    || startsTable(line, next);
}

const startsTable = (line, next = "") => TABLE_ROW.test(line) && TABLE_SEP.test(next);

function renderBlock(lines, i, parent) {
  const line = lines[i];
  if (!line.trim()) return i + 1;
  const fence = line.match(FENCE);
  if (fence) return codeBlock(lines, i, fence, parent);
  const heading = line.match(HEADING);
  if (heading) {
    // h1/h2 belong to the page itself, so a reply's "#" starts at h3.
    const h = el(`h${Math.min(heading[1].length + 2, 6)}`);
    appendInline(h, heading[2]);
    parent.append(h);
    return i + 1;
  }
  if (RULE.test(line)) {
    parent.append(el("hr"));
    return i + 1;
  }
  if (ITEM.test(line)) return list(lines, i, parent);
  if (QUOTE.test(line)) return quote(lines, i, parent);
  if (startsTable(line, lines[i + 1])) return table(lines, i, parent);
  return paragraph(lines, i, parent);
}

/** A fenced block; an unclosed fence runs to the end, which is what a reply still streaming looks like. */
function codeBlock(lines, i, fence, parent) {
  const [, indent, marker, lang] = fence;
  const body = [];
  let j = i + 1;
  for (; j < lines.length; j++) {
    const close = lines[j].match(FENCE);
    if (close && close[2][0] === marker[0] && close[2].length >= marker.length && !close[3]) break;
    body.push(lines[j].startsWith(indent) ? lines[j].slice(indent.length) : lines[j].trimStart());
  }
  const box = el("div", "code-block");
  const head = el("div", "code-head");
  const label = el("span", "code-lang");
  label.textContent = lang || "code";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${lang || "code"} block`);
  const code = el("code");
  code.textContent = body.join("\n");
  copy.addEventListener("click", () => copyText(code.textContent, copy));
  head.append(label, copy);
  const pre = el("pre");
  pre.append(code);
  box.append(head, pre);
  parent.append(box);
  return Math.min(j + 1, lines.length);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";  // clipboard needs a secure context (https or localhost)
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function list(lines, i, parent) {
  const first = lines[i].match(ITEM);
  const indent = first[1].length;
  const ordered = first[2] === undefined;
  const listEl = el(ordered ? "ol" : "ul");
  if (ordered && first[3] !== "1") listEl.start = Number(first[3]);
  let li = null;
  while (i < lines.length) {
    const line = lines[i];
    const item = line.match(ITEM);
    const depth = item ? item[1].length : 0;
    if (item && depth >= indent + 2 && li) {
      i = list(lines, i, li);
    } else if (item && depth >= indent && (item[2] === undefined) === ordered) {
      li = el("li");
      appendInline(li, item[4]);
      listEl.append(li);
      i += 1;
    } else if (li && FENCE.test(line) && /^\s/.test(line)) {
      i = codeBlock(lines, i, line.match(FENCE), li);
    } else if (li && line.trim() && /^\s/.test(line) && !item) {
      li.append("\n");
      appendInline(li, line.trim());
      i += 1;
    } else if (!line.trim() && (lines[i + 1]?.match(ITEM)?.[1].length ?? -1) >= indent) {
      i += 1;  // a blank line between items keeps the list going
    } else {
      break;
    }
  }
  parent.append(listEl);
  return i;
}

function quote(lines, i, parent) {
  const inner = [];
  while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].match(QUOTE)[1]);
  const box = el("blockquote");
  let j = 0;
  while (j < inner.length) j = renderBlock(inner, j, box);
  parent.append(box);
  return i;
}

function table(lines, i, parent) {
  const cells = (row) => row.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
  const tableEl = el("table");
  const headRow = el("tr");
  for (const cell of cells(lines[i])) {
    const th = el("th");
    appendInline(th, cell);
    headRow.append(th);
  }
  tableEl.append(el("thead"), el("tbody"));
  tableEl.tHead.append(headRow);
  i += 2;
  for (; i < lines.length && TABLE_ROW.test(lines[i]); i++) {
    const tr = el("tr");
    for (const cell of cells(lines[i])) {
      const td = el("td");
      appendInline(td, cell);
      tr.append(td);
    }
    tableEl.tBodies[0].append(tr);
  }
  const scroller = el("div", "table-wrap");
  scroller.append(tableEl);
  parent.append(scroller);
  return i;
}

function paragraph(lines, i, parent) {
  const text = [lines[i]];
  for (i += 1; i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1]); i++) {
    text.push(lines[i]);
  }
  const p = el("p");
  appendInline(p, text.join("\n"));
  parent.append(p);
  return i;
}

/** Inline spans: code, bold, italic, strikethrough; a link or image becomes its text plus the URL as text. */
export function appendInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    parent.append(inlineNode(m));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function inlineNode(m) {
  if (m[1] !== undefined) {
    const code = el("code");
    code.textContent = m[2];
    return code;
  }
  const [tag, inner] = m[3] ?? m[4] ? ["strong", m[3] ?? m[4]]
    : m[5] ?? m[6] ? ["em", m[5] ?? m[6]]
    : m[7] !== undefined ? ["del", m[7]] : ["span", m[8]];
  const node = el(tag);
  appendInline(node, inner);
  if (tag === "span") {
    // Links are never made clickable: a model can write any URL, including javascript:.
    node.className = "link-text";
    const url = m[9];
    if (url && url !== inner) {
      const shown = el("span", "link-url");
      shown.textContent = ` (${url})`;
      node.append(shown);
    }
  }
  return node;
}
