"""The snippet's built-in texts, served as data in its config (the script carries none).

A tenant overrides any of them per language through ``PUT /v1/tenant/snippet``. ``{purposes}``
in ``body`` becomes the titles of the purposes the policy version in effect asks about, so the
default describes what the tenant actually does. Units turn a cookie's lifetime in seconds
into words ("2 years"); ``plural`` picks the form for a count (CLDR rules, simplified to the
integer counts a lifetime produces)."""

from __future__ import annotations

from collections.abc import Callable

TEXT_KEYS = ("title", "body", "accept_all", "reject_all", "settings", "save", "close", "acknowledge",
             "cookies_heading", "gpc_notice", "policy", "session_lifetime", "always_on", "col_cookie",
             "col_provider", "col_lifetime", "load")
RTL = frozenset({"ar", "he", "fa", "ur"})
LIST_SEPARATOR = {"ar": "، ", "ja": "、", "zh": "、"}  # joins the purpose titles in {purposes}

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Your privacy choices",
        "body": "We use cookies and similar technologies for: {purposes}. Optional ones stay off "
                "unless you allow them, and you can change your mind at any time.",
        "accept_all": "Accept all", "reject_all": "Reject all", "settings": "Preferences",
        "save": "Save choices", "close": "Close", "acknowledge": "OK", "cookies_heading": "Cookies",
        "gpc_notice": "Opt-Out Preference Signal Honored", "policy": "Privacy policy",
        "session_lifetime": "until sign-out", "always_on": "Always on", "col_cookie": "Cookie",
        "col_provider": "Provider", "col_lifetime": "Lifetime",
        "load": "Load content",
    },
    "de": {
        "title": "Ihre Datenschutz-Einstellungen",
        "body": "Wir verwenden Cookies und ähnliche Technologien für: {purposes}. Optionale bleiben "
                "aus, bis Sie zustimmen; Sie können Ihre Wahl jederzeit ändern.",
        "accept_all": "Alle akzeptieren", "reject_all": "Alle ablehnen", "settings": "Einstellungen",
        "save": "Auswahl speichern", "close": "Schließen", "acknowledge": "OK", "cookies_heading": "Cookies",
        "gpc_notice": "Opt-out-Präferenzsignal berücksichtigt", "policy": "Datenschutzerklärung",
        "session_lifetime": "bis zur Abmeldung", "always_on": "Immer aktiv", "col_cookie": "Cookie",
        "col_provider": "Anbieter", "col_lifetime": "Laufzeit",
        "load": "Inhalt laden",
    },
    "fr": {
        "title": "Vos choix de confidentialité",
        "body": "Nous utilisons des cookies et technologies similaires pour : {purposes}. Les "
                "optionnels restent désactivés sauf si vous les autorisez ; vous pouvez changer "
                "d'avis à tout moment.",
        "accept_all": "Tout accepter", "reject_all": "Tout refuser", "settings": "Préférences",
        "save": "Enregistrer", "close": "Fermer", "acknowledge": "OK", "cookies_heading": "Cookies",
        "gpc_notice": "Signal de préférence de refus respecté", "policy": "Politique de confidentialité",
        "session_lifetime": "jusqu'à la déconnexion", "always_on": "Toujours actif", "col_cookie": "Cookie",
        "col_provider": "Fournisseur", "col_lifetime": "Durée",
        "load": "Charger le contenu",
    },
    "es": {
        "title": "Tus opciones de privacidad",
        "body": "Usamos cookies y tecnologías similares para: {purposes}. Las opcionales permanecen "
                "desactivadas salvo que las permitas; puedes cambiar de opinión en cualquier momento.",
        "accept_all": "Aceptar todo", "reject_all": "Rechazar todo", "settings": "Preferencias",
        "save": "Guardar", "close": "Cerrar", "acknowledge": "De acuerdo", "cookies_heading": "Cookies",
        "gpc_notice": "Señal de preferencia de exclusión respetada", "policy": "Política de privacidad",
        "session_lifetime": "hasta cerrar sesión", "always_on": "Siempre activas", "col_cookie": "Cookie",
        "col_provider": "Proveedor", "col_lifetime": "Duración",
        "load": "Cargar contenido",
    },
    "it": {
        "title": "Le tue scelte sulla privacy",
        "body": "Usiamo cookie e tecnologie simili per: {purposes}. Quelli facoltativi restano "
                "disattivati finché non li consenti; puoi cambiare idea in qualsiasi momento.",
        "accept_all": "Accetta tutto", "reject_all": "Rifiuta tutto", "settings": "Preferenze",
        "save": "Salva scelte", "close": "Chiudi", "acknowledge": "OK", "cookies_heading": "Cookie",
        "gpc_notice": "Segnale di preferenza di opt-out rispettato", "policy": "Informativa sulla privacy",
        "session_lifetime": "fino alla disconnessione", "always_on": "Sempre attivi", "col_cookie": "Cookie",
        "col_provider": "Fornitore", "col_lifetime": "Durata",
        "load": "Carica contenuto",
    },
    "nl": {
        "title": "Uw privacykeuzes",
        "body": "Wij gebruiken cookies en vergelijkbare technieken voor: {purposes}. Optionele "
                "blijven uit tenzij u ze toestaat; u kunt uw keuze altijd wijzigen.",
        "accept_all": "Alles accepteren", "reject_all": "Alles weigeren", "settings": "Voorkeuren",
        "save": "Keuzes opslaan", "close": "Sluiten", "acknowledge": "OK", "cookies_heading": "Cookies",
        "gpc_notice": "Opt-outvoorkeurssignaal gerespecteerd", "policy": "Privacybeleid",
        "session_lifetime": "tot afmelden", "always_on": "Altijd aan", "col_cookie": "Cookie",
        "col_provider": "Aanbieder", "col_lifetime": "Looptijd",
        "load": "Inhoud laden",
    },
    "pt": {
        "title": "As suas escolhas de privacidade",
        "body": "Usamos cookies e tecnologias semelhantes para: {purposes}. Os opcionais ficam "
                "desligados a menos que os permita; pode mudar de ideias a qualquer momento.",
        "accept_all": "Aceitar tudo", "reject_all": "Rejeitar tudo", "settings": "Preferências",
        "save": "Guardar escolhas", "close": "Fechar", "acknowledge": "OK", "cookies_heading": "Cookies",
        "gpc_notice": "Sinal de preferência de exclusão respeitado", "policy": "Política de privacidade",
        "session_lifetime": "até terminar a sessão", "always_on": "Sempre ativos", "col_cookie": "Cookie",
        "col_provider": "Fornecedor", "col_lifetime": "Duração",
        "load": "Carregar conteúdo",
    },
    "pl": {
        "title": "Twoje wybory dotyczące prywatności",
        "body": "Używamy plików cookie i podobnych technologii do: {purposes}. Opcjonalne pozostają "
                "wyłączone, dopóki ich nie zaakceptujesz; zdanie możesz zmienić w każdej chwili.",
        "accept_all": "Akceptuj wszystkie", "reject_all": "Odrzuć wszystkie", "settings": "Ustawienia",
        "save": "Zapisz wybór", "close": "Zamknij", "acknowledge": "OK", "cookies_heading": "Pliki cookie",
        "gpc_notice": "Sygnał preferencji rezygnacji uwzględniony", "policy": "Polityka prywatności",
        "session_lifetime": "do wylogowania", "always_on": "Zawsze włączone", "col_cookie": "Plik cookie",
        "col_provider": "Dostawca", "col_lifetime": "Okres ważności",
        "load": "Wczytaj treść",
    },
    "sv": {
        "title": "Dina integritetsval",
        "body": "Vi använder kakor och liknande tekniker för: {purposes}. Valfria är avstängda om "
                "du inte tillåter dem, och du kan ändra dig när som helst.",
        "accept_all": "Godkänn alla", "reject_all": "Avvisa alla", "settings": "Inställningar",
        "save": "Spara val", "close": "Stäng", "acknowledge": "OK", "cookies_heading": "Kakor",
        "gpc_notice": "Signal för avböjande respekteras", "policy": "Integritetspolicy",
        "session_lifetime": "tills du loggar ut", "always_on": "Alltid på", "col_cookie": "Kaka",
        "col_provider": "Leverantör", "col_lifetime": "Livslängd",
        "load": "Läs in innehåll",
    },
    "ja": {
        "title": "プライバシー設定",
        "body": "当サイトは次の目的で Cookie および類似の技術を使用します：{purposes}。任意のものは"
                "許可されるまで無効で、いつでも変更できます。",
        "accept_all": "すべて同意", "reject_all": "すべて拒否", "settings": "詳細設定",
        "save": "選択を保存", "close": "閉じる", "acknowledge": "OK", "cookies_heading": "Cookie",
        "gpc_notice": "オプトアウト設定シグナルを尊重しています", "policy": "プライバシーポリシー",
        "session_lifetime": "サインアウトまで", "always_on": "常に有効", "col_cookie": "Cookie",
        "col_provider": "提供元", "col_lifetime": "有効期間",
        "load": "コンテンツを読み込む",
    },
    "hi": {
        "title": "आपकी गोपनीयता के विकल्प",
        "body": "हम इनके लिए कुकीज़ और समान तकनीकों का उपयोग करते हैं: {purposes}। वैकल्पिक कुकीज़ आपकी "
                "अनुमति के बिना बंद रहती हैं, और आप कभी भी अपनी पसंद बदल सकते हैं।",
        "accept_all": "सभी स्वीकार करें", "reject_all": "सभी अस्वीकार करें", "settings": "प्राथमिकताएँ",
        "save": "विकल्प सहेजें", "close": "बंद करें", "acknowledge": "ठीक है", "cookies_heading": "कुकीज़",
        "gpc_notice": "ऑप्ट-आउट प्राथमिकता संकेत का सम्मान किया गया", "policy": "गोपनीयता नीति",
        "session_lifetime": "साइन-आउट तक", "always_on": "हमेशा चालू", "col_cookie": "कुकी",
        "col_provider": "प्रदाता", "col_lifetime": "अवधि",
        "load": "सामग्री लोड करें",
    },
    "ar": {
        "title": "خيارات الخصوصية",
        "body": "نستخدم ملفات تعريف الارتباط وتقنيات مشابهة من أجل: {purposes}. تبقى الاختيارية "
                "معطلة ما لم تسمح بها، ويمكنك تغيير رأيك في أي وقت.",
        "accept_all": "قبول الكل", "reject_all": "رفض الكل", "settings": "التفضيلات",
        "save": "حفظ الاختيارات", "close": "إغلاق", "acknowledge": "حسنًا",
        "cookies_heading": "ملفات تعريف الارتباط",
        "gpc_notice": "تم احترام إشارة تفضيل إلغاء الاشتراك", "policy": "سياسة الخصوصية",
        "session_lifetime": "حتى تسجيل الخروج", "always_on": "مفعّلة دائمًا", "col_cookie": "الملف",
        "col_provider": "المزوّد", "col_lifetime": "المدة",
        "load": "تحميل المحتوى",
    },
}

# unit -> forms, in the order ``plural`` returns indexes for that language
UNITS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"y": ("year", "years"), "mo": ("month", "months"), "d": ("day", "days"),
           "h": ("hour", "hours"), "min": ("minute", "minutes"), "s": ("second", "seconds")},
    "de": {"y": ("Jahr", "Jahre"), "mo": ("Monat", "Monate"), "d": ("Tag", "Tage"),
           "h": ("Stunde", "Stunden"), "min": ("Minute", "Minuten"), "s": ("Sekunde", "Sekunden")},
    "fr": {"y": ("an", "ans"), "mo": ("mois", "mois"), "d": ("jour", "jours"),
           "h": ("heure", "heures"), "min": ("minute", "minutes"), "s": ("seconde", "secondes")},
    "es": {"y": ("año", "años"), "mo": ("mes", "meses"), "d": ("día", "días"),
           "h": ("hora", "horas"), "min": ("minuto", "minutos"), "s": ("segundo", "segundos")},
    "it": {"y": ("anno", "anni"), "mo": ("mese", "mesi"), "d": ("giorno", "giorni"),
           "h": ("ora", "ore"), "min": ("minuto", "minuti"), "s": ("secondo", "secondi")},
    "nl": {"y": ("jaar", "jaar"), "mo": ("maand", "maanden"), "d": ("dag", "dagen"),
           "h": ("uur", "uur"), "min": ("minuut", "minuten"), "s": ("seconde", "seconden")},
    "pt": {"y": ("ano", "anos"), "mo": ("mês", "meses"), "d": ("dia", "dias"),
           "h": ("hora", "horas"), "min": ("minuto", "minutos"), "s": ("segundo", "segundos")},
    "pl": {"y": ("rok", "lata", "lat"), "mo": ("miesiąc", "miesiące", "miesięcy"),
           "d": ("dzień", "dni", "dni"), "h": ("godzina", "godziny", "godzin"),
           "min": ("minuta", "minuty", "minut"), "s": ("sekunda", "sekundy", "sekund")},
    "sv": {"y": ("år", "år"), "mo": ("månad", "månader"), "d": ("dag", "dagar"),
           "h": ("timme", "timmar"), "min": ("minut", "minuter"), "s": ("sekund", "sekunder")},
    "ja": {"y": ("年",), "mo": ("か月",), "d": ("日",), "h": ("時間",), "min": ("分",), "s": ("秒",)},
    "hi": {"y": ("वर्ष", "वर्ष"), "mo": ("महीना", "महीने"), "d": ("दिन", "दिन"),
           "h": ("घंटा", "घंटे"), "min": ("मिनट", "मिनट"), "s": ("सेकंड", "सेकंड")},
    # one, two, few (3-10), many (11+)
    "ar": {"y": ("سنة", "سنتان", "سنوات", "سنة"), "mo": ("شهر", "شهران", "أشهر", "شهرًا"),
           "d": ("يوم", "يومان", "أيام", "يومًا"), "h": ("ساعة", "ساعتان", "ساعات", "ساعة"),
           "min": ("دقيقة", "دقيقتان", "دقائق", "دقيقة"), "s": ("ثانية", "ثانيتان", "ثوانٍ", "ثانية")},
}


def _pl(n: int) -> int:
    if n == 1:
        return 0
    return 1 if n % 10 in (2, 3, 4) and n % 100 not in (12, 13, 14) else 2


def _ar(n: int) -> int:
    return 0 if n == 1 else 1 if n == 2 else 2 if 3 <= n % 100 <= 10 else 3


PLURAL: dict[str, Callable[[int], int]] = {
    "pl": _pl, "ar": _ar, "ja": lambda n: 0,
    "fr": lambda n: 0 if n <= 1 else 1, "pt": lambda n: 0 if n <= 1 else 1, "hi": lambda n: 0 if n <= 1 else 1,
}
STEPS = (("y", 365 * 86400), ("mo", 30 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def human_lifetime(lifetime: str | int, lang: str, session_text: str) -> str:
    """A cookie lifetime in words: ``63072000`` -> "2 years", ``"session"`` -> ``session_text``.
    The largest unit that fits at least once, rounded to the nearest whole count."""
    if lifetime == "session" or not str(lifetime).isdigit():
        return session_text
    seconds = int(lifetime)
    units = UNITS.get(lang, UNITS["en"])
    for unit, size in STEPS:
        if seconds >= size:
            n = max(1, round(seconds / size))
            forms = units[unit]
            form = forms[min(PLURAL.get(lang, lambda n: 0 if n == 1 else 1)(n), len(forms) - 1)]
            return f"{n}{form}" if lang == "ja" else f"{n} {form}"
    return session_text
