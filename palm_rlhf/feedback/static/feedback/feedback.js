// Keyboard shortcuts for fast raters: a key press clicks the button of the current card whose
// data-key matches it, so the htmx form submits exactly as if the button had been clicked.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.target.closest("input, textarea, select")) return;
  const button = document.querySelector(`#card button[data-key="${CSS.escape(event.key.toLowerCase())}"]`);
  if (button) {
    event.preventDefault();
    button.click();
  }
});

// A 409 carries the next card (the answer was already in, e.g. a retry after a lost response):
// swap it in like a 200, so the rater moves on instead of staying on the answered card.
document.addEventListener("htmx:beforeSwap", (event) => {
  if (event.detail.xhr.status === 409) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});

// htmx leaves the page as it is on other 4xx/5xx answers; show the server's reason instead.
document.addEventListener("htmx:responseError", (event) => {
  const flash = document.getElementById("flash");
  flash.textContent = event.detail.xhr.responseText || `Error ${event.detail.xhr.status}`;
  flash.hidden = false;
});
document.addEventListener("htmx:afterSwap", () => {
  document.getElementById("flash").hidden = true;
});
