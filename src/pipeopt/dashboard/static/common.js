// pipeopt pages: the helpers every page script shares, on window.pipeopt.
//
// Text from the server goes into elements with textContent only, never parsed as HTML.
"use strict";

(function () {
  // Control characters in names and errors are shown as their visible pictures
  // (ESC as U+241B), so a name cannot move the cursor or ring a bell: it reads as text.
  const visible = function (text, keepLines) {
    const value = text === null || text === undefined ? "" : String(text);
    return value.replace(/[\u0000-\u001f\u007f]/g, function (ch) {
      if (keepLines && (ch === "\n" || ch === "\t")) {
        return ch;
      }
      return ch === "\u007f" ? "\u2421" : String.fromCharCode(0x2400 + ch.charCodeAt(0));
    });
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) {
      node.textContent = value;
    }
  }

  window.pipeopt = { visible: visible, el: el, setText: setText };
})();
