// Drover web UI: the navigation's menus are <details> elements, which work without this
// script; with it, opening one closes the others, and a click elsewhere or Escape closes it.
(() => {
  const menus = () => document.querySelectorAll("header nav details.menu");
  document.addEventListener("toggle", (e) => {
    if (!e.target.matches || !e.target.matches("header nav details.menu") || !e.target.open) return;
    for (const m of menus()) if (m !== e.target) m.open = false;
  }, true);
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest("header nav details.menu")) return;
    for (const m of menus()) m.open = false;
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") for (const m of menus()) m.open = false;
  });
})();
