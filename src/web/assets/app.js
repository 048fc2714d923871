// wfq dashboard: refreshes every [data-live] region from its URL every 2 s
// (paused by the Live button, and while the tab is hidden), asks before
// buttons with data-confirm, and selects every run with data-select-all.
(function () {
  "use strict";
  var EVERY = 2000;
  var paused = localStorage.getItem("wfq-live-paused") === "1";
  var toggle = document.getElementById("live-toggle");
  var stamp = document.getElementById("live-stamp");
  var regions = document.querySelectorAll("[data-live]");

  function show() {
    if (!toggle) return;
    toggle.textContent = paused ? "Paused" : "Live";
    toggle.className = paused ? "paused" : "on";
  }
  function refresh() {
    if (paused || document.hidden) return;
    regions.forEach(function (region) {
      // Never wipe what someone is typing or choosing.
      var active = document.activeElement;
      if (active && region.contains(active) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName)) return;
      fetch(region.getAttribute("data-live"), { credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
        .then(function (html) {
          region.innerHTML = html;
          if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
        })
        .catch(function () { if (stamp) stamp.textContent = "refresh failed"; });
    });
  }
  if (regions.length && toggle) {
    toggle.hidden = false;
    show();
    toggle.addEventListener("click", function () {
      paused = !paused;
      localStorage.setItem("wfq-live-paused", paused ? "1" : "0");
      show();
      refresh();
    });
    setInterval(refresh, EVERY);
    document.addEventListener("visibilitychange", refresh);
  }
  document.addEventListener("click", function (e) {
    var b = e.target.closest("[data-confirm]");
    if (b && !window.confirm(b.getAttribute("data-confirm"))) e.preventDefault();
  });
  var all = document.querySelector("[data-select-all]");
  if (all) all.addEventListener("change", function () {
    document.querySelectorAll("input[name=id][type=checkbox]").forEach(function (c) { c.checked = all.checked; });
  });
})();
