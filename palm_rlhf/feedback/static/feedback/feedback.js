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

// htmx leaves the page as it is on a 4xx/5xx answer; show the server's reason instead.
document.addEventListener("htmx:responseError", (event) => {
  const flash = document.getElementById("flash");
  flash.textContent = event.detail.xhr.responseText || `Error ${event.detail.xhr.status}`;
  flash.hidden = false;
});
document.addEventListener("htmx:afterSwap", () => {
  document.getElementById("flash").hidden = true;
});
