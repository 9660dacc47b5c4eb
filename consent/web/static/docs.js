// Starts Swagger UI (shipped in this package) on the document named by data-url.
(function () {
  var el = document.getElementById("swagger-ui");
  window.SwaggerUIBundle({ url: el.getAttribute("data-url"), domNode: el, deepLinking: true,
                           docExpansion: "list", defaultModelsExpandDepth: 0 });
})();
