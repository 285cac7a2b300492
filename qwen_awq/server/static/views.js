/* DOM builders for the chat page: one message (the user's text, or the model's reply as Markdown rendered to
   text nodes) and one entry of the conversation list. */
import { renderMarkdown } from "./markdown.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function messageView(msg) {
  const article = el("article", `msg msg-${msg.role}`);
  article.append(el("h3", "msg-role", msg.role === "user" ? "You" : "Assistant"), el("div", "msg-body"));
  fillMessage(article, msg);
  return article;
}

/** (Re)draw a message's body; called once per animation frame while a reply streams. */
export function fillMessage(article, msg) {
  const body = article.querySelector(".msg-body");
  if (msg.role === "user") body.textContent = msg.content;
  else body.replaceChildren(renderMarkdown(msg.content));
  article.querySelector(".msg-note")?.remove();
  const note = msg.stopped ? "Stopped." : msg.failed ? "Interrupted by an error."
    : msg.finish === "length" ? "Cut off at the max-tokens limit." : "";
  if (note) article.append(el("p", "msg-note", note));
}

export function chatListItem(chat, current, onOpen, onDelete) {
  const title = chat.title || "New chat";
  const open = el("button", "chat-open", title);
  open.type = "button";
  if (current) open.setAttribute("aria-current", "page");
  open.addEventListener("click", onOpen);
  const remove = el("button", "chat-delete", "×");
  remove.type = "button";
  remove.setAttribute("aria-label", `Delete chat “${title}”`);
  remove.addEventListener("click", onDelete);
  const li = document.createElement("li");
  li.append(open, remove);
  return li;
}
